"""Cost models: exact packed bytes (size), latency / BitOps / energy on a device. No torch at import."""

from autocomp.cost.size import layer_bytes, plan_bytes

__all__ = ["plan_bytes", "layer_bytes"]
