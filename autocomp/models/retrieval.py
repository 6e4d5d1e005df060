"""The built-in model's true metric: docstring retrieval on real text made offline at run time.

Pairs come from the installed Python standard library: for every function, class or module docstring with
at least two paragraphs, the query is the summary line and the document is the rest. Only modules that the
calibration and training text (:mod:`autocomp.models.textdata`) never reads are used, so the three sets
are disjoint by construction. Every query is ranked against every document of the held-out set by cosine
similarity of the embeddings; the score is the mean reciprocal rank (MRR) of the right document, with
recall@1 beside it and a bootstrap interval over pairs as the metric's own noise.
"""

from __future__ import annotations

import ast
import functools
import os
import random
import re
import sysconfig
from pathlib import Path
from typing import Any

from autocomp.models.textdata import CALIBRATION_MODULES

__all__ = ["pairs", "RetrievalTask"]

_SKIP_DIRS = ("idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "ensurepip", "__pycache__")


@functools.lru_cache(maxsize=1)
def pairs() -> tuple[tuple[str, str], ...]:
    """(query, document) pairs, deduplicated, in a fixed shuffled order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    used = {root / f"{m}.py" for m in CALIBRATION_MODULES}
    found: dict[str, str] = {}
    docs_seen: set[str] = set()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test") and "-" not in d]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py") and not f.startswith("test")]
    for path in sorted(files):
        if path in used:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc) if p.strip()]
            if len(paras) < 2:
                continue
            query, body = paras[0], " ".join(paras[1:])
            if not (25 <= len(query) <= 200 and len(query.split()) >= 4 and len(body) >= 80):
                continue
            if ">>>" in body[:80] or query in found or body in docs_seen:
                continue
            found[query] = body
            docs_seen.add(body)
    out = sorted(found.items())
    random.Random(20261123).shuffle(out)
    return tuple(out)


class RetrievalTask:
    """MRR of query -> document retrieval over ``n`` held-out pairs (higher is better)."""

    name = "mrr"

    def __init__(self, tokenizer: Any, n: int = 500, query_len: int = 32, doc_len: int = 48, batch: int = 64) -> None:
        all_pairs = pairs()
        if len(all_pairs) < n:
            from autocomp.errors import AutocompError

            raise AutocompError(f"this Python installation yields only {len(all_pairs)} retrieval pairs; ask for fewer")
        self.pairs = all_pairs[:n]
        from autocomp.models.textdata import tokenize_batches

        self.queries = tokenize_batches(tokenizer, [q for q, _ in self.pairs], max_length=query_len, batch_size=batch)
        self.docs = tokenize_batches(tokenizer, [d for _, d in self.pairs], max_length=doc_len, batch_size=batch)
        # tokenize_batches sorts by length: remember where each text went
        self._q_order = self._order(tokenizer, [q for q, _ in self.pairs], query_len)
        self._d_order = self._order(tokenizer, [d for _, d in self.pairs], doc_len)

    @staticmethod
    def _order(tokenizer: Any, texts: list[str], max_length: int) -> list[int]:
        lengths = [len(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts]
        return sorted(range(len(texts)), key=lambda i: (lengths[i], i))

    def _embed(self, model: Any, batches: list[Any], order: list[int]) -> Any:
        import torch

        with torch.inference_mode():
            out = torch.cat([model(**b).float() for b in batches])
        emb = torch.empty_like(out)
        emb[torch.tensor(order)] = out
        return torch.nn.functional.normalize(emb, dim=-1)

    def ranks(self, model: Any) -> Any:
        """Rank (1 = best) of the right document for every query."""

        q = self._embed(model, self.queries, self._q_order)
        d = self._embed(model, self.docs, self._d_order)
        sim = q @ d.T
        right = sim.diagonal().unsqueeze(1)
        return (sim > right).sum(1) + 1

    def score(self, model: Any) -> dict[str, float]:
        r = self.ranks(model).double()
        return {"mrr": float((1.0 / r).mean()), "recall@1": float((r == 1).double().mean())}

    def __call__(self, model: Any) -> float:
        return self.score(model)["mrr"]

    @staticmethod
    def bootstrap(ranks: Any, n: int = 1000, seed: int = 0) -> tuple[float, float]:
        """95% bootstrap interval of the MRR over pairs: the metric's own noise at this set size."""
        import torch

        g = torch.Generator().manual_seed(seed)
        rr = 1.0 / ranks.double()
        idx = torch.randint(0, len(rr), (n, len(rr)), generator=g)
        means = rr[idx].mean(1).sort().values
        return float(means[int(0.025 * n)]), float(means[int(0.975 * n)])
