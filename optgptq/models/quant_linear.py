"""GPTQ-quantized linear layers: checkpoint settings, the layer, and swapping it into a model.

A GPTQ checkpoint (the standard layout, see :mod:`optgptq_kernels.gptq`) stores, for every
quantized ``nn.Linear`` named ``x``, the tensors ``x.qweight``, ``x.qzeros``, ``x.scales``,
``x.g_idx`` (and ``x.bias`` if any) instead of ``x.weight``; config.json carries a
``quantization_config`` with ``quant_method: gptq``. Which layers are quantized is read from the
checkpoint's tensor names, so layers a quantizer left in full precision (``lm_head``, modules it
was told to skip) load as ordinary linears. The forward pass goes through the kernels' dispatch
point (fused dequant-GEMM on an accelerator, dequantize-then-matmul reference on CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from optgptq_kernels import ops
from optgptq_kernels.gptq import SUPPORTED_BITS, dequantize_ref, pack_cols

QUANT_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class GPTQConfig:
    """The parts of a checkpoint's ``quantization_config`` that decide its tensor shapes."""

    bits: int
    group_size: int

    @classmethod
    def from_hf(cls, qc: dict) -> "GPTQConfig":
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt != "gptq":
            raise ValueError(f"quantization_config.checkpoint_format={fmt!r} is not supported "
                             f"(supported: gptq)")
        bits, group_size = qc.get("bits"), qc.get("group_size", -1)
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"quantization_config.bits={bits!r}: expected one of {SUPPORTED_BITS}")
        if not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
            raise ValueError(f"quantization_config.group_size={group_size!r}: expected a "
                             f"positive int or -1 (per channel)")
        return cls(bits, group_size)

    def num_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)


class GPTQLinear(nn.Module):
    """``y = x @ W + b`` with ``W`` stored GPTQ-packed; a drop-in for ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, config: GPTQConfig,
                 bias: bool) -> None:
        super().__init__()
        bits = config.bits
        if in_features * bits % 32 or out_features * bits % 32:
            raise ValueError(f"a {in_features}x{out_features} layer cannot hold whole 32-bit "
                             f"words of {bits}-bit codes")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        groups = config.num_groups(in_features)
        self.register_buffer("qweight", torch.empty(in_features * bits // 32, out_features,
                                                    dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(groups, out_features * bits // 32,
                                                   dtype=torch.int32))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def random_tensors(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random codes around the middle zero point (a symmetric grid), scales that give the
        weights a standard deviation near 0.02 (activations stay finite through deep random
        models), groups in order (no bias)."""
        dev = generator.device

        def words(shape):
            return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, device=dev,
                                 generator=generator)

        groups = self.scales.shape[0]
        size = math.ceil(self.in_features / groups)
        middle = torch.full((groups, self.out_features), 2 ** (self.bits - 1) - 1)
        code_std = ((4 ** self.bits - 1) / 12) ** 0.5       # uniform codes about the middle
        scales = torch.rand(self.scales.shape, device=dev, generator=generator) + 0.5
        return {"qweight": words(self.qweight.shape),
                "qzeros": pack_cols(middle, self.bits).to(dev),
                "scales": (scales * 0.02 / code_std).half(),
                "g_idx": (torch.arange(self.in_features, device=dev) // size).int()}

    @classmethod
    def concat(cls, layers: list["GPTQLinear"]) -> "GPTQLinear | None":
        """One layer computing the concatenated outputs of ``layers`` (codes, zeros, scales and
        biases side by side; all or none have a bias), or None unless they share the input,
        bit width and group layout (``g_idx``)."""
        first = layers[0]
        if any(layer.in_features != first.in_features or layer.bits != first.bits
               or layer.scales.shape[0] != first.scales.shape[0]
               or not torch.equal(layer.g_idx, first.g_idx) for layer in layers):
            return None
        with torch.device("meta"):  # shapes only: every tensor is replaced below
            merged = cls(first.in_features, sum(layer.out_features for layer in layers),
                         GPTQConfig(first.bits, -1), first.bias is not None)
        for name in ("qweight", "qzeros", "scales"):
            setattr(merged, name, torch.cat([getattr(layer, name) for layer in layers], 1))
        merged.g_idx = first.g_idx
        if first.bias is not None:
            merged.bias = nn.Parameter(torch.cat([layer.bias for layer in layers]),
                                       requires_grad=False)
        return merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = ops.gptq_linear(x.reshape(-1, self.in_features), self.qweight, self.qzeros,
                              self.scales, self.g_idx, self.bits, self.bias)
        return out.view(*shape[:-1], self.out_features)


def gptq_dense_weight(tensors: dict[str, torch.Tensor], config: GPTQConfig) -> torch.Tensor:
    """The float32 ``[out, in]`` weight that a GPTQ linear's checkpoint tensors stand for."""
    return dequantize_ref(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                          tensors["g_idx"], config.bits, torch.float32).t()
