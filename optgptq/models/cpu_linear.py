"""Float linears for the CPU, their weights stored transposed: ``y = x @ W^T + b`` with ``W^T``
kept as a contiguous ``[in, out]`` matrix.

``nn.Linear`` keeps ``W`` as ``[out, in]`` and hands the BLAS a transposed operand. On this
project's CPU (AVX-512, MKL through ``torch.mm``) the product with a row-major ``[in, out]``
weight ran 1.8x faster at 16 rows and 1.3x at 48, the row counts of a decode step, and no slower
from 128 to 1024 rows (SmolLM2's four layer shapes, float32, all 30 layers' weights streamed
from memory as in a decode step: 1.1-1.3x). The model runner swaps the model's float
``nn.Linear`` layers for :class:`TransposedLinear` once weights are loaded and merged, on the
CPU only. The output head (``lm_head``) stays as it is: its 576 x 49152 product ran no faster
transposed at the 40-64 rows of a full decode step, and a tied head would need its own copy.

Up to :data:`PACKED_MAX_ROWS` rows (decode steps) a layer runs the native panel-packed kernel
instead (``kernels/linear_cpu.cpp``, AVX-512): its weight is also kept as 64-column panels, each
contiguous, so a panel streams from memory while the previous one is multiplied, 1.2-1.3x faster
than ``torch.mm`` at 8-64 rows over all 30 layers, 0.92x at 1024 rows. That second copy of the
weights (424 MB for SmolLM2) is the price.
"""

from __future__ import annotations

import torch
from torch import nn

from optgptq_kernels import ops

PACKED_MAX_ROWS = 64


class TransposedLinear(nn.Module):
    """A float ``nn.Linear`` with its weight stored as ``[in_features, out_features]``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias
        self.packed = ops.pack_linear_weight(linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.packed is not None and flat.shape[0] <= PACKED_MAX_ROWS and flat.stride(1) == 1:
            out = ops.packed_linear(flat, self.packed, self.out_features, self.bias)
        else:
            out = (torch.mm(flat, self.weight_t) if self.bias is None
                   else torch.addmm(self.bias, flat, self.weight_t))
        return out.view(*x.shape[:-1], self.out_features)


@torch.no_grad()
def transpose_linears(model: nn.Module, keep: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every float32 CPU ``nn.Linear`` of ``model`` not named in ``keep`` by a
    :class:`TransposedLinear`; returns how many were replaced."""
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children()
             if type(child) is nn.Linear and name not in keep
             and child.weight.device.type == "cpu" and child.weight.dtype == torch.float32]
    for parent, name, child in swaps:
        setattr(parent, name, TransposedLinear(child))
    return len(swaps)
