"""Quantized linears on the CPU: GPTQ layers swapped for the native kernel's layout at load, and
one warning where a checkpoint's layers are left on a path known to be slow.

A :class:`~optgptq.models.quant_linear.GPTQLinear` keeps the checkpoint's tensors; on a CPU its
forward pass through the dispatch point would repack them on every call. The model runner
calls :func:`use_cpu_gptq_linears` once weights are loaded and merged (on the CPU only): every
GPTQ layer becomes a :class:`CPUGPTQLinear` holding its weight once, repacked for the native
kernel (:mod:`optgptq_kernels.gptq_cpu`: 64-column panels of 2/3/4/8-bit codes in exact integer
products with INT8 activations), and the checkpoint's tensors are dropped with the old module,
so the codes are not held twice.

Slow paths, warned about once per model (the PyTorch references dequantize every weight to a
float matrix on every call: a 4-bit SmolLM2 checkpoint decoded at about 1 token/s, 40x slower
than its float model):

- GPTQ where the native kernels are not built (no compiler, ``OPTGPTQ_KERNELS=reference``);
- GPTQT (binary-coded planes, :mod:`optgptq_kernels.bcq`) and DGQ (A8W4,
  :mod:`optgptq_kernels.dgq`), which have no native CPU kernel yet. GPTQT's weights are per
  column float sums of +-alpha planes, not integers times a scale, so its codes do not fit the
  GPTQ kernel's exact integer products; it needs its own decoder (a masked add per plane) and a
  float product. DGQ's product is integer like the GPTQ kernel's, but its reference is exact:
  per-token INT8 activations of ``x / smooth`` rounded half away from zero, one int32 sum over
  all inputs, then ``acc * s_tok * s_c``; the GPTQ kernel rescales per 64-input segment in
  float and rounds half to even, so serving DGQ bit for bit needs its own activation quantizer
  and epilogue. Neither is what ``optgptq quantize`` writes by default; both are left to a
  follow-up.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from optgptq.models.bcq_linear import BCQLinear
from optgptq.models.dgq_linear import DGQLinear
from optgptq.models.quant_linear import GPTQLinear
from optgptq_kernels import ops
from optgptq_kernels.gptq_cpu import PackedGPTQ

log = logging.getLogger(__name__)


class CPUGPTQLinear(nn.Module):
    """A GPTQ linear whose weight is held only in the native CPU kernel's layout."""

    def __init__(self, layer: GPTQLinear, packed: PackedGPTQ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = (layer.in_features, layer.out_features,
                                                          layer.bits)
        self.packed = packed
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = ops.packed_gptq_linear(flat, self.packed, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def _slow_path_warning(model: nn.Module) -> str | None:
    kinds = {type(m) for m in model.modules()}
    if GPTQLinear in kinds:
        return ("GPTQ layers run the PyTorch reference on this CPU (native kernels not built, or "
                "OPTGPTQ_KERNELS is not auto): every weight is dequantized on every call, "
                "tens of times slower than the float model")
    slow = [name for cls, name in ((BCQLinear, "GPTQT"), (DGQLinear, "DGQ")) if cls in kinds]
    if slow:
        return (f"{'/'.join(slow)} layers have no native CPU kernel and run the PyTorch "
                f"reference, which dequantizes every weight on every call: tens of times slower "
                f"than the float model (GPTQ checkpoints have a native CPU kernel)")
    return None


@torch.no_grad()
def use_cpu_gptq_linears(model: nn.Module) -> int:
    """Replace every CPU :class:`GPTQLinear` of ``model`` by a :class:`CPUGPTQLinear` where the
    native kernel runs; log one warning if quantized layers are left on a slow path. Returns
    how many layers were replaced."""
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children()
             if type(child) is GPTQLinear and child.qweight.device.type == "cpu"]
    replaced = 0
    for parent, name, child in swaps:
        packed = ops.pack_gptq_weight(child.qweight, child.qzeros, child.scales, child.g_idx,
                                      child.bits)
        if packed is None:
            break
        setattr(parent, name, CPUGPTQLinear(child, packed))
        replaced += 1
    if (warning := _slow_path_warning(model)) is not None:
        log.warning(warning)
    return replaced
