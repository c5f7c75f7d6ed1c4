"""Binary-coded linear layers of GPTQT checkpoints: their settings and the layer.

A GPTQT checkpoint (:mod:`optgptq.compress.quant.gptqt` writes it) stores, for every quantized
``nn.Linear`` named ``x``, ``x.planes`` (int32 ``[bits, in / 32, out]``), ``x.alphas`` (float16
``[groups, bits, out]``) and ``x.offsets`` (float16 ``[groups, out]``), plus ``x.bias`` if any,
in the layout of :mod:`optgptq_kernels.bcq`; config.json's ``quantization_config`` has
``quant_method: gptqt``, ``bits`` (the planes, 2 or 3) and ``group_size``. The forward pass goes
through the kernels' dispatch point (LUT / bit-plane GEMM on an accelerator, dequantize-then-
matmul reference on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from optgptq_kernels import ops
from optgptq_kernels.bcq import SUPPORTED_BITS, check_layout, dequantize_bcq_ref, num_groups


@dataclass(frozen=True)
class GPTQTConfig:
    """The parts of a GPTQT ``quantization_config`` that decide its tensor shapes."""

    bits: int
    group_size: int

    @classmethod
    def from_hf(cls, qc: dict) -> "GPTQTConfig":
        bits, group_size = qc.get("bits"), qc.get("group_size", -1)
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"quantization_config.bits={bits!r}: expected one of "
                             f"{SUPPORTED_BITS} binary-coding planes")
        if not isinstance(group_size, int) or (group_size != -1 and (group_size < 32
                                                                      or group_size % 32)):
            raise ValueError(f"quantization_config.group_size={group_size!r}: expected a "
                             f"positive multiple of 32 or -1 (one group)")
        return cls(bits, group_size)


class BCQLinear(nn.Module):
    """``y = x @ W + b`` with ``W`` stored as binary-coding planes; a drop-in for ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, config: GPTQTConfig,
                 bias: bool) -> None:
        super().__init__()
        check_layout(config.bits, in_features, config.group_size)
        self.in_features, self.out_features = in_features, out_features
        self.group_size = config.group_size
        groups = num_groups(in_features, config.group_size)
        self.register_buffer("planes", torch.empty(config.bits, in_features // 32, out_features,
                                                   dtype=torch.int32))
        self.register_buffer("alphas", torch.empty(groups, config.bits, out_features,
                                                   dtype=torch.float16))
        self.register_buffer("offsets", torch.empty(groups, out_features, dtype=torch.float16))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = ops.bcq_linear(x.reshape(-1, self.in_features), self.planes, self.alphas,
                             self.offsets, self.group_size, self.bias)
        return out.view(*shape[:-1], self.out_features)


def bcq_dense_weight(tensors: dict[str, torch.Tensor], config: GPTQTConfig) -> torch.Tensor:
    """The float32 ``[out, in]`` weight that a GPTQT linear's checkpoint tensors stand for."""
    return dequantize_bcq_ref(tensors["planes"], tensors["alphas"], tensors["offsets"],
                              config.group_size, torch.float32).t()
