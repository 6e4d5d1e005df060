"""Devices as data: one YAML file per device, every figure with its source.

Built-in files live in ``autocomp/cost/devices/``; ``autocomp hardware calibrate`` writes new ones
(``cpu-local`` by default, under ``studies/hardware/``). ``--hardware`` takes a name or a path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from autocomp.errors import AutocompError

__all__ = ["Device", "load_device", "list_devices", "BUILTIN_DIR", "local_dir", "DTYPE_BITS"]

BUILTIN_DIR = Path(__file__).resolve().parent / "devices"
DTYPE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8}


def local_dir() -> Path:
    """Where calibrated device files go and are looked up: $AUTOCOMP_HARDWARE or studies/hardware."""
    return Path(os.environ.get("AUTOCOMP_HARDWARE", Path(os.environ.get("AUTOCOMP_STUDIES", "studies")) / "hardware"))


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    kind: str
    peak_ops: Mapping[str, float]  # dense operations/s per dtype
    memory_bandwidth: float  # bytes/s
    eff_compute: float
    eff_memory: float
    layer_overhead_s: float
    default_dtype: str  # what layers that are not accelerated compute in
    int8: bool  # W8A8 int8 kernels (per-channel symmetric weights)
    weight_only_bits: tuple[int, ...]  # kernels that read packed low-bit weights
    sparse_2_4: float | None  # speed-up of 2:4 kernels, or None
    unstructured_sparse: bool
    correction: Mapping[str, Any] | None = None
    sources: Mapping[str, str] = field(default_factory=dict)
    path: str = ""
    runtime: str = "torch"  # what runs the plans: torch eager, or "ort" (ONNX Runtime: autocomp export --format onnx)
    ort: Mapping[str, Any] | None = None  # runtime "ort": the timed kernel fits (autocomp hardware calibrate --runtime ort)

    @property
    def act_bytes(self) -> int:
        return DTYPE_BITS[self.default_dtype] // 8

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "kind": self.kind,
                "peak_tops": {k: v / 1e12 for k, v in self.peak_ops.items()},
                "memory_gbps": self.memory_bandwidth / 1e9, "default_dtype": self.default_dtype,
                "int8_kernels": self.int8, "weight_only_bits": list(self.weight_only_bits),
                "sparse_2_4": self.sparse_2_4, "calibrated": self.correction is not None,
                "sources": dict(self.sources), "path": self.path}


def _figure(d: Mapping[str, Any], key: str, src: str, sources: dict[str, str]) -> float:
    item = d.get(key)
    if not isinstance(item, Mapping) or "value" not in item:
        raise AutocompError(f"device file {src}: '{key}' is missing; give {{value: ..., source: ...}}")
    try:
        value = float(item["value"])
    except (TypeError, ValueError):
        raise AutocompError(f"device file {src}: '{key}' value {item['value']!r} is not a number") from None
    if not value > 0:
        raise AutocompError(f"device file {src}: '{key}' must be positive, got {value}")
    if not str(item.get("source", "")).strip():
        raise AutocompError(f"device file {src}: '{key}' has no source; say where the number comes from")
    sources[key] = str(item["source"])
    return value


def parse_device(data: Any, src: str) -> Device:
    if not isinstance(data, Mapping):
        raise AutocompError(f"device file {src} must be a mapping")
    for key in ("name", "peak_ops", "default_dtype"):
        if key not in data:
            raise AutocompError(f"device file {src}: '{key}' is missing")
    sources: dict[str, str] = {}
    peaks_raw = data["peak_ops"]
    if not isinstance(peaks_raw, Mapping) or not peaks_raw:
        raise AutocompError(f"device file {src}: 'peak_ops' must map dtypes ({', '.join(DTYPE_BITS)}) to figures")
    peaks = {}
    for dt in peaks_raw:
        if dt not in DTYPE_BITS:
            raise AutocompError(f"device file {src}: unknown dtype {dt!r} in peak_ops; use {', '.join(DTYPE_BITS)}")
        peaks[dt] = _figure(peaks_raw, dt, src, sources)
    if data["default_dtype"] not in peaks:
        raise AutocompError(f"device file {src}: default_dtype {data['default_dtype']!r} has no peak_ops figure")
    eff = data.get("efficiency") or {}
    acc = data.get("accelerates") or {}
    if acc.get("int8") and "int8" not in peaks:
        raise AutocompError(f"device file {src}: accelerates int8 but peak_ops has no int8 figure")
    sparse = acc.get("sparse_2_4")
    speedup = None
    if isinstance(sparse, Mapping):
        speedup = float(sparse.get("speedup", 0))
        if not speedup > 1:
            raise AutocompError(f"device file {src}: sparse_2_4 speedup must be > 1, got {speedup}")
    runtime = str(data.get("runtime", "torch"))
    ort = data.get("ort")
    if runtime not in ("torch", "ort"):
        raise AutocompError(f"device file {src}: runtime must be torch or ort, got {runtime!r}")
    if runtime == "ort" and not (isinstance(ort, Mapping) and isinstance(ort.get("kernels"), Mapping)):
        raise AutocompError(f"device file {src}: runtime ort needs the 'ort' kernel fits; write it with "
                            f"`autocomp hardware calibrate --runtime ort`")
    return Device(
        name=str(data["name"]), description=str(data.get("description", "")), kind=str(data.get("kind", "")),
        peak_ops=peaks, memory_bandwidth=_figure(data, "memory_bandwidth", src, sources),
        eff_compute=_figure(eff, "compute", src, sources), eff_memory=_figure(eff, "memory", src, sources),
        layer_overhead_s=_figure(data, "layer_overhead_s", src, sources),
        default_dtype=str(data["default_dtype"]), int8=bool(acc.get("int8", False)),
        weight_only_bits=tuple(int(b) for b in acc.get("weight_only_bits", []) or []),
        sparse_2_4=speedup, unstructured_sparse=bool(acc.get("unstructured_sparse", False)),
        correction=data.get("correction"), sources=sources, path=src, runtime=runtime, ort=ort,
    )


def _read(path: Path) -> Device:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise AutocompError(f"device file {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}; fix "
                            f"the file") from None
    return parse_device(data, str(path))


def list_devices() -> list[Device]:
    paths = sorted(BUILTIN_DIR.glob("*.yaml"))
    if local_dir().is_dir():
        paths += sorted(local_dir().glob("*.yaml"))
    return [_read(p) for p in paths]


def load_device(name: str) -> Device:
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise AutocompError(f"device file {name!r} does not exist")
        return _read(p)
    for d in (local_dir(), BUILTIN_DIR):
        cand = d / f"{name}.yaml"
        if cand.is_file():
            return _read(cand)
    if name == "cpu-local":
        raise AutocompError(
            f"device 'cpu-local' is not calibrated yet; run `autocomp hardware calibrate` (writes {local_dir() / 'cpu-local.yaml'})"
        )
    if name == "ort-cpu":
        raise AutocompError(f"device 'ort-cpu' is not calibrated yet; run `autocomp hardware calibrate --runtime ort` "
                            f"(writes {local_dir() / 'ort-cpu.yaml'})")
    known = ", ".join(sorted({q.stem for q in BUILTIN_DIR.glob('*.yaml')} | {"cpu-local", "ort-cpu"}))
    raise AutocompError(f"unknown device {name!r}; use one of {known} or a device YAML path")
