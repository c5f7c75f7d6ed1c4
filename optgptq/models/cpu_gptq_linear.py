"""Quantized linears on the CPU: GPTQ layers swapped for the native kernel's layout at load, and
one warning where a checkpoint's layers are left on a path known to be slow.

A :class:`~optgptq.models.quant_linear.GPTQLinear` keeps the checkpoint's tensors; on a CPU its
forward pass through the dispatch point would repack them on every call. The model runner
calls :func:`use_cpu_gptq_linears` once weights are loaded and merged (on the CPU only): every
GPTQ layer becomes a :class:`CPUGPTQLinear` holding its weight once, repacked for the native
kernel (:mod:`optgptq_kernels.gptq_cpu`: 64-column panels of 2/3/4/8-bit codes in exact integer
products with INT8 activations), and the checkpoint's tensors are dropped with the old module,
so the codes are not held twice.

The output head of a GPTQ checkpoint is float (``optgptq quantize`` and GPTQModel leave it so):
for SmolLM2 its 49152 x 576 weight is 57 MB in float16 against 53 MB for all 4-bit layers,
more than half of what a decode step reads. Where the quantized layers run with one INT8 piece
per activation (the default, already not the reference's arithmetic), the head is rounded at
load to 8-bit codes, one float16 scale per 64 inputs (:func:`quantize_int8_cpu`: llama.cpp's
Q8_0, which its 4-bit SmolLM2 file uses for this matrix), and runs on the same kernel: half
the bytes. Measured (one thread, CPU time, at one row): 3.1-4.2 ms float16 -> 1.4-1.5 ms; on
4096 tokens of Emma a 4-bit SmolLM2 checkpoint's perplexity moved from 46.68 to 46.74 (+0.12%,
the head's INT8 input included). A tied input embedding keeps the exact weight (in float16
where every value is one), reading one row per token. With ``OPTGPTQ_CPU_GPTQ_ACT=int16`` the
head stays float.

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
from optgptq.models.cpu_linear import tied_embeddings
from optgptq.models.dgq_linear import DGQLinear
from optgptq.models.quant_linear import GPTQLinear
from optgptq_kernels import ops
from optgptq_kernels.gptq_cpu import PackedGPTQ, quantize_int8_cpu

log = logging.getLogger(__name__)


class CPUGPTQLinear(nn.Module):
    """A quantized linear whose weight is held only in the native CPU kernel's layout."""

    def __init__(self, packed: PackedGPTQ, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = (packed.in_features,
                                                          packed.out_features, packed.bits)
        self.packed = packed
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = ops.packed_gptq_linear(flat, self.packed, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


class FrozenEmbedding(nn.Module):
    """An input embedding kept apart from the head it was tied to: float16 rows where every
    value is a float16 value (widened exactly), float32 otherwise."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        half = weight.detach().half()
        self.table = half if torch.equal(half.float(), weight) else weight.detach().clone()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.table).float()


def _head_to_int8(model: nn.Module) -> None:
    """The float output head (``lm_head``) in 8-bit codes on the INT8 kernel (module docstring);
    an embedding tied to it gets its own copy of the exact weight."""
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear or head.weight.dtype != torch.float32:
        return
    for parent, name, _ in tied_embeddings(model, {head.weight.data_ptr()}):
        setattr(parent, name, FrozenEmbedding(head.weight))
    model.lm_head = CPUGPTQLinear(quantize_int8_cpu(head.weight), head.bias)


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
        setattr(parent, name, CPUGPTQLinear(packed, child.bias))
        replaced += 1
    if replaced and replaced == len(swaps) and packed.act_pieces == 1:
        _head_to_int8(model)
    if (warning := _slow_path_warning(model)) is not None:
        log.warning(warning)
    return replaced
