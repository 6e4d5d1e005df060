"""Compressed weights on disk, shared by every search of the same model on this machine.

A search compresses each (layer, option) once and keeps the result in memory (:class:`PlanApplier`). That
work is lost when the process ends and is not shared: two workers of one study, a resumed study, or a second
search of the same model at another budget each compute it again. On MiniLM with random plans a cold option
costs about as much as the forward pass it feeds (160-280 ms a trial of a 1-thread worker, docs/BENCHMARKS.md),
and a GPTQ option ~38 ms a layer; reading the same matrix back takes well under a millisecond.

:class:`WeightStore` keeps the compressed weights that cost more to compute than to write (more than
:data:`MIN_MS_PER_MB` per MB: GPTQ / SparseGPT / activation-aware options, a layer's first SVD or sort) under
``<studies>/weights/``; cheap round-to-nearest options are recomputed, because writing every one cost a fresh
MiniLM search of random plans 15-25% of its speed (docs/BENCHMARKS.md). One safetensors file per weight,
named by a key of everything the weight depends on:

- the model's weights (:func:`~autocomp.search.sensitivity.weights_hash`: not only the layout);
- the calibration statistics' key where the model has them (compensated options, refits);
- for an embedding table compressed on the rows the calibration looks up, those rows;
- the layer, its options (``LayerPlan.to_dict``) and its structured cut;
- the source of every registered technique and of ``autocomp.compressors`` (an edited or upgraded
  technique never reads weights an older version wrote), and the torch version.

So a hit is the matrix this process would have computed, bit for bit (tested). Files are written to a temp
file and renamed (readers see a whole file or none; two workers writing the same key write the same bytes);
a damaged or unreadable file is a miss and is removed. The folder is bounded: when a process has added more
than the remaining room it lists the folder and removes the least recently used files (a hit refreshes a
file's time) down to 80% of the bound. Workers check only after their own writes, so several at once can
overshoot by what the others wrote since their last check. It is a cache: deleting the folder loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_STORE_BYTES", "WeightStore", "code_digest"]

FORMAT = "autocomp.weights/1"
DEFAULT_STORE_BYTES = 2 << 30  # a 100-trial MiniLM search wrote ~0.1 GB (default space) or ~0.9 GB (compensated)
MIN_MS_PER_MB = 8.0  # write only weights whose compression took longer than this per MB (see put)
_SUFFIX = ".safetensors"
_CODE: str | None = None


def code_digest() -> str:
    """Hash of the source of ``autocomp.compressors`` and of every registered technique's module (plug-ins
    included), and of the torch version: what decides the bytes a compression computes."""
    global _CODE
    if _CODE is None:
        import inspect

        import torch

        from autocomp.compressors.base import registered

        files = set(Path(__file__).parent.glob("*.py"))
        for t in registered():
            src = inspect.getsourcefile(type(t))
            if src:
                files.add(Path(src))
        h = hashlib.sha256(torch.__version__.encode())
        for f in sorted(files):
            h.update(f.name.encode())
            h.update(f.read_bytes())
        _CODE = h.hexdigest()[:16]
    return _CODE


class WeightStore:
    """``get(key)`` / ``put(key, weight, bias)`` of compressed weights in ``root``, at most ``limit`` bytes."""

    def __init__(self, root: str | os.PathLike[str], limit: int = DEFAULT_STORE_BYTES) -> None:
        self.root = Path(root)
        self.limit = int(limit)
        self.hits = self.misses = self.writes = self.skipped = 0
        self._added = 0  # bytes this process wrote since it last listed the folder
        self._room: int | None = None  # what the folder could take at the last listing
        self._broken = False  # the folder cannot be written: stop trying (a cache never fails a search)

    # -- keys -------------------------------------------------------------------------------------------------
    @staticmethod
    def key(**parts: Any) -> str:
        body = json.dumps({"format": FORMAT, "code": code_digest(), **parts}, sort_keys=True, default=str)
        return hashlib.sha256(body.encode()).hexdigest()[:32]

    def _path(self, key: str) -> Path:
        return self.root / f"{key}{_SUFFIX}"

    # -- reads and writes -------------------------------------------------------------------------------------
    def get(self, key: str) -> tuple[Any, Any] | None:
        """(weight, bias or None), or None on a miss."""
        from safetensors.torch import load_file

        path = self._path(key)
        try:
            tensors = load_file(str(path))
            weight = tensors["weight"]
        except FileNotFoundError:
            self.misses += 1
            return None
        except Exception:  # noqa: BLE001 -- damaged (a crash before the data reached the disk), or not ours: recompute
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        try:
            os.utime(path)  # recently used
        except OSError:
            pass
        self.hits += 1
        return weight, tensors.get("bias")

    def put(self, key: str, weight: Any, bias: Any = None, seconds: float | None = None) -> None:
        """Keep one compressed weight. ``seconds``: what computing it took; a weight cheaper to compute than
        :data:`MIN_MS_PER_MB` per MB of it is not written (writing it costs more than it saves)."""
        if self._broken or self.limit <= 0:
            return
        from safetensors.torch import save_file

        tensors = {"weight": weight.contiguous()}
        if bias is not None:
            tensors["bias"] = bias.contiguous()
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size > self.limit // 4 or (seconds is not None and seconds * 1e3 < MIN_MS_PER_MB * size / 1e6):
            self.skipped += 1
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{os.getpid()}.", suffix=".tmp")
            os.close(fd)
            try:
                save_file(tensors, tmp)
                os.replace(tmp, self._path(key))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except Exception:  # noqa: BLE001 -- a full disk, a read-only folder (safetensors raises its own type)
            self._broken = True
            return
        self.writes += 1
        self._added += size
        if self._room is None or self._added > self._room:
            self.trim()

    def trim(self) -> None:
        """List the folder; if it holds more than the bound, remove least recently used files down to 80% of
        it (and temp files whose writer is gone)."""
        from autocomp.files import _alive

        files = []
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return
        for e in entries:
            try:
                st = e.stat()
            except OSError:
                continue
            if e.name.endswith(".tmp"):
                pid = e.name[1:].split(".", 1)[0]
                if pid.isdigit() and not _alive(int(pid)):
                    Path(e.path).unlink(missing_ok=True)
                continue
            if e.name.endswith(_SUFFIX):
                files.append((st.st_mtime, st.st_size, e.path))
        total = sum(s for _, s, _ in files)
        if total > self.limit:
            files.sort()
            for _, size, path in files:
                if total <= 0.8 * self.limit:
                    break
                Path(path).unlink(missing_ok=True)
                total -= size
        self._added = 0
        self._room = max(self.limit - total, 0)

    def nbytes(self) -> int:
        """Bytes of weight files in the folder now."""
        try:
            return sum(e.stat().st_size for e in os.scandir(self.root) if e.name.endswith(_SUFFIX))
        except OSError:
            return 0
