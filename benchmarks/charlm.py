"""A character-level language model built from torch's own ``nn.TransformerEncoderLayer`` (issue #11's new
user): 4 layers, d=192, 4 heads, FFN 768, a causal mask, learned positions, 1.84 M parameters, its logits
returned as a plain tensor. Trained here on the standard library's docstring sentences (the text autocomp
calibrates MiniLM with; nothing downloaded), and held out on sentences it never sees.

Factories for the CLI (``--model benchmarks/charlm.py:model`` after :func:`train_fp32` wrote the weights):

* ``model``   -- the trained model (weights from ``$AUTOCOMP_CHARLM`` or the default cache path);
* ``calib``   -- 8 calibration batches of 16 x 64 characters (from the training text);
* ``train``   -- 200 training batches of 16 x 64 characters (for ``autocomp train``);
* ``heldout`` -- 16 batches of 16 x 64 characters of held-out text (for ``evaluate --task perplexity``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

CTX = 128
WEIGHTS = Path(os.environ.get("AUTOCOMP_CHARLM", Path(tempfile.gettempdir()) / "autocomp-charlm" / "charlm.pt"))


class CharLM(nn.Module):
    def __init__(self, vocab: int, dim: int = 192, heads: int = 4, layers: int = 4, ff: int = 768) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, CTX, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.tok(ids) + self.pos[:, :t]
        h = self.encoder(h, mask=nn.Transformer.generate_square_subsequent_mask(t), is_causal=True)
        return self.head(self.norm(h))


def _text() -> tuple[str, str, str]:
    """(alphabet, training text, held-out text): stdlib docstring sentences, the last 15% held out."""
    from autocomp.models.textdata import sentences

    s = list(sentences())
    cut = int(len(s) * 0.85)
    train, held = " ".join(s[:cut]), " ".join(s[cut:])
    alphabet = "".join(sorted(set(train) | set(held)))
    return alphabet, train, held


def _encode(text: str, alphabet: str) -> torch.Tensor:
    index = {c: i for i, c in enumerate(alphabet)}
    return torch.tensor([index[c] for c in text], dtype=torch.long)


def _chunks(ids: torch.Tensor, n: int, batch: int, length: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length - 1, (n, batch), generator=g)
    return [torch.stack([ids[s:s + length] for s in row.tolist()]) for row in starts]


def train_fp32(steps: int = 600, lr: float = 2e-3, path: Path = WEIGHTS, log: bool = True) -> Path:
    """Train the fp32 model (AdamW, cosine decay, batch 16 x 128) and save it; -> the weights path."""
    import math
    import time

    alphabet, train, _ = _text()
    ids = _encode(train, alphabet)
    torch.manual_seed(0)
    model = CharLM(len(alphabet))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - CTX - 1, (16,), generator=g).tolist()
        x = torch.stack([ids[s:s + CTX + 1] for s in starts])
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step % 100 == 0 or step == steps - 1):
            print(f"  fp32 step {step}: loss {loss.item():.3f} ({loss.item() / math.log(2):.3f} bits/char), "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"alphabet": alphabet, "state": model.state_dict()}, tmp)
    tmp.replace(path)
    return path


def model() -> nn.Module:
    if not WEIGHTS.is_file():
        raise FileNotFoundError(f"{WEIGHTS} does not exist: run benchmarks/bench_charlm.py (it trains the model first)")
    saved = torch.load(WEIGHTS, weights_only=True)
    m = CharLM(len(saved["alphabet"]))
    m.load_state_dict(saved["state"])
    return m.eval()


def calib() -> list[torch.Tensor]:
    alphabet, train, _ = _text()
    return _chunks(_encode(train, alphabet), 8, 16, 64, seed=2)


def train() -> list[torch.Tensor]:
    alphabet, text, _ = _text()
    return _chunks(_encode(text, alphabet), 200, 16, 64, seed=3)


def heldout() -> list[torch.Tensor]:
    alphabet, _, held = _text()
    return _chunks(_encode(held, alphabet), 16, 16, 64, seed=4)
