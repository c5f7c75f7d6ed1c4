"""optgptq_kernels: the engine's compute kernels, each beside its PyTorch reference.

Installed under the import name ``optgptq_kernels`` (the folder is ``kernels/``; a top-level
``kernels`` would clash with Hugging Face's package of that name). Imports nothing from optgptq.
Callers go through :mod:`optgptq_kernels.ops`, the one dispatch point.
"""

from optgptq_kernels import ops

__all__ = ["ops"]
