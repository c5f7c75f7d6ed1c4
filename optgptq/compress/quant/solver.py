"""What every quantization method's solver is to the driver, and what its solvers share.

A method (a row of :data:`optgptq.compress.quant.methods.METHODS`) brings a settings class (its
*spec*) and a :class:`Solver`: built for the linears that read one input of ``in_features``,
it accumulates that input (``add_batch``) and quantizes their stacked weight into a
:class:`Result`. Rows are independent given the input statistics, so the driver
(:mod:`optgptq.compress.quant.pipeline`) splits the result back into one per linear; each
result knows its checkpoint tensors, and the spec its ``quantization_config``, which is all
the checkpoint writer (:mod:`optgptq.compress.quant.checkpoint`) needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Protocol

import torch


class Result:
    """Base of a solver's result for one weight ``[N, K]``, a dataclass whose tensor fields
    ``ROW_DIMS`` names with the dimension that runs over the ``N`` output rows; other fields
    (shared by all rows) are kept whole by :meth:`split`."""

    ROW_DIMS: ClassVar[dict[str, int]]

    def split(self, sizes: list[int]) -> list[Any]:
        """The results of the row blocks of a stacked weight (output rows ``sizes``)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        parts = {name: fields[name].split(sizes, dim) for name, dim in self.ROW_DIMS.items()}
        return [dataclasses.replace(self, **{name: p[i] for name, p in parts.items()})
                for i in range(len(sizes))]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The linear's checkpoint tensors (without bias), keyed by leaf name."""
        raise NotImplementedError


class Solver(Protocol):
    """Accumulates the input of the linears reading it, then quantizes their stacked weight."""

    def add_batch(self, x: torch.Tensor) -> None: ...

    def quantize(self, weight: torch.Tensor, spec: Any) -> Result: ...


def check_loop_settings(damp: float, block_size: int) -> None:
    """``ValueError`` unless the settings of GPTQ's error-feedback loop (GPTQ, GPTQT) are valid:
    dampening a fraction in (0, 1), a positive column block."""
    if not 0 < damp < 1:
        raise ValueError(f"damp must lie in (0, 1), got {damp}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")


@contextmanager
def one_thread() -> Iterator[int]:
    """Torch's intra-op pool at one thread for the block (the solvers' loops of small ops);
    yields the number of threads it had."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)
