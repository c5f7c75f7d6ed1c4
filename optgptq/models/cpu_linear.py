"""Float linears for the CPU, each weight stored once in the layout its product runs fastest from.

``nn.Linear`` keeps ``W`` as ``[out, in]`` and hands the BLAS a transposed operand. A
:class:`CPULinear` keeps the weight instead as:

- panels for the native kernel (``kernels/linear_cpu.cpp``, AVX-512 builds): 64-column panels,
  each contiguous, so a panel streams from memory while the previous one is multiplied; in
  float16 where every weight is a float16 value (a checkpoint stored in float16, like the output
  head of a GPTQ checkpoint from ``optgptq quantize``: 57 instead of 113 MB for SmolLM2's head,
  the same products, widened exactly in registers). Over
  SmolLM2's 30 layers (float32, weights streamed from memory as in a decode step) it ran
  1.2-1.3x faster than ``torch.mm`` at 8-64 rows, the row counts of a decode step, and
  0.79-0.97x at the 128-1024 rows of prefill chunks;
- otherwise a contiguous ``[in, out]`` matrix for ``torch.mm``, which ran 1.8x faster at 16 rows
  and 1.3x at 48 than ``nn.Linear``'s transposed operand, and no slower from 128 to 1024 rows.

One copy only: a second layout for prefill-sized products would have been up to 1.27x faster
there, at the price of every weight twice in memory (424 MB more for SmolLM2, 28 GB for an 8B
model in float32). The model runner swaps the model's float ``nn.Linear`` layers for
:class:`CPULinear` once weights are loaded and merged, on the CPU only, the output head included:
SmolLM2's 576 x 49152 head ran 2.3x faster packed than ``nn.Linear`` at the 35 rows of an
average decode step (16.9 -> 7.2 ms), and 1.6x at 64. A tied input embedding then reads its rows
from the head's layout (:class:`CPUEmbedding`), so the tied matrix is still stored once.
"""

from __future__ import annotations

import torch
from torch import nn

from optgptq_kernels import ops


class CPULinear(nn.Module):
    """A float32 ``nn.Linear`` whose weight is kept packed for the native kernel where that runs,
    else as ``weight_t [in_features, out_features]``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.bias = linear.bias
        self.packed = ops.pack_linear_weight(weight)
        self.weight_t = (None if self.packed is not None else
                         nn.Parameter(weight.t().contiguous(), requires_grad=False))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``W[ids]`` of the ``[out, in]`` weight, bit for bit, as ``[len(ids), in]``."""
        if self.packed is not None:
            panels = self.packed.shape[2]
            return self.packed[ids // panels, :, ids % panels].float()
        return self.weight_t.index_select(1, ids).t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.packed is not None:
            out = ops.packed_linear(flat.contiguous(), self.packed, self.out_features, self.bias)
        elif self.bias is None:
            out = torch.mm(flat, self.weight_t)
        else:
            out = torch.addmm(self.bias, flat, self.weight_t)
        return out.view(*x.shape[:-1], self.out_features)


class CPUEmbedding(nn.Module):
    """An ``nn.Embedding`` tied to a linear's weight (an output head), reading its rows from that
    :class:`CPULinear`'s layout instead of keeping the matrix a second time."""

    def __init__(self, linear: CPULinear) -> None:
        super().__init__()
        self.linear = [linear]  # the owner of the weight, kept out of this module's state dict

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return self.linear[0].rows(flat).reshape(*ids.shape, -1)


def tied_embeddings(model: nn.Module, storages: set[int]) -> list[tuple[nn.Module, str, int]]:
    """``(parent, name, storage)`` of every ``nn.Embedding`` whose weight is one of ``storages``
    (``data_ptr``s): tied weights are one storage, which the loader assigns to each tied name
    as its own Parameter, so identity of the Parameters does not find them."""
    return [(parent, name, child.weight.data_ptr()) for parent in model.modules()
            for name, child in parent.named_children()
            if type(child) is nn.Embedding and child.weight.data_ptr() in storages]


def _swappable(module: nn.Module) -> bool:
    return (type(module) is nn.Linear and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32)


@torch.no_grad()
def use_cpu_linears(model: nn.Module) -> int:
    """Replace every float32 CPU ``nn.Linear`` of ``model`` by a :class:`CPULinear`, and every
    ``nn.Embedding`` that shares a replaced linear's weight by a :class:`CPUEmbedding` over it;
    returns how many linears were replaced."""
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if _swappable(child)]
    by_weight = {}
    for parent, name, child in swaps:
        by_weight[child.weight.data_ptr()] = replacement = CPULinear(child)
        setattr(parent, name, replacement)
    for parent, name, ptr in tied_embeddings(model, set(by_weight)):
        setattr(parent, name, CPUEmbedding(by_weight[ptr]))
    return len(swaps)
