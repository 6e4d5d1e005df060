"""Cost models: pure arithmetic over layer descriptions (no torch)."""

from __future__ import annotations

from autocomp.cost.size import plan_bytes, layer_bytes, tensor_bytes, n_pruned

__all__ = ["plan_bytes", "layer_bytes", "tensor_bytes", "n_pruned"]
