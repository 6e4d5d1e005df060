"""Compression techniques: the contract and registry (``base``), one module per technique (``quantize``,
``prune``, ``lowrank``; ``structured`` cuts whole units at plan level), their composition (``pipeline``),
the proxy's weight swapping (``apply``) and the trainable student (``student``). Light at import."""
