"""The built-in techniques: importing a technique's module registers it (one line each)."""

from autocomp.compressors import quantize  # noqa: F401  (axis order: quant, prune, rank, codebook)
from autocomp.compressors import prune  # noqa: F401
from autocomp.compressors import lowrank  # noqa: F401
from autocomp.compressors import codebook  # noqa: F401
