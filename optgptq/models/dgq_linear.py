"""DGQ A8W4 linear layers: checkpoint settings, the layer, and its dense weight.

A DGQ checkpoint (layout in :mod:`optgptq_kernels.dgq`) stores, for every quantized
``nn.Linear`` named ``x``, the tensors ``x.qweight`` (INT4 codes), ``x.qzeros``, ``x.qscales``
(INT8 group scales), ``x.scales`` (float16 channel scales), ``x.smooth`` (float16 activation
divisors) and ``x.bias`` if any; config.json's ``quantization_config`` is::

    {quant_method: dgq, bits: 4, act_bits: 8, group_size, sym: false, act_granularity: per_token,
     clip_percentile, fine_grid, fine_min_ratio, coarse_grid, coarse_min_ratio,
     checkpoint_format: dgq, lm_head: false}

(the search settings are recorded for provenance; only ``group_size`` shapes the tensors). The
layer quantizes its input per token to INT8 and runs one INT8 GEMM through the kernels' dispatch
point, so unlike GPTQ its output is *not* a dense matmul with :func:`dgq_dense_weight`, which
leaves activation quantization out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from optgptq_kernels import ops
from optgptq_kernels.dgq import BITS, dense_weight_ref, num_groups

ACT_BITS = 8


@dataclass(frozen=True)
class DGQConfig:
    """The parts of a DGQ ``quantization_config`` that decide its tensors and numerics."""

    group_size: int

    @classmethod
    def from_hf(cls, qc: dict) -> "DGQConfig":
        fmt = qc.get("checkpoint_format", "dgq")
        if fmt != "dgq":
            raise ValueError(f"quantization_config.checkpoint_format={fmt!r} is not supported "
                             f"for dgq (supported: dgq)")
        checks = (("bits", BITS), ("act_bits", ACT_BITS), ("sym", False),
                  ("act_granularity", "per_token"))
        for key, value in checks:
            if qc.get(key, value) != value:
                raise ValueError(f"quantization_config.{key}={qc[key]!r}: dgq supports only "
                                 f"{value!r}")
        group_size = qc.get("group_size")
        if (not isinstance(group_size, int) or isinstance(group_size, bool)
                or (group_size < 1 and group_size != -1)):
            raise ValueError(f"quantization_config.group_size={group_size!r}: expected a "
                             f"positive int or -1 (per channel)")
        return cls(group_size)


class DGQLinear(nn.Module):
    """``y = A8(x) @ W4->8 + b``; a drop-in for ``nn.Linear`` (module docstring)."""

    def __init__(self, in_features: int, out_features: int, config: DGQConfig,
                 bias: bool) -> None:
        super().__init__()
        if in_features % 8:
            raise ValueError(f"a layer with {in_features} input features cannot hold whole "
                             f"32-bit words of 4-bit codes (needs a multiple of 8)")
        self.in_features, self.out_features = in_features, out_features
        self.group_size = config.group_size
        groups = num_groups(in_features, config.group_size)
        self.register_buffer("qweight", torch.empty(in_features // 8, out_features,
                                                    dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(groups, out_features, dtype=torch.uint8))
        self.register_buffer("qscales", torch.empty(groups, out_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float16))
        self.register_buffer("smooth", torch.empty(in_features, dtype=torch.float16))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def random_tensors(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random codes about the middle zero point, group scales in 1..8 (so every INT8 weight
        fits), channel scales giving the weights a standard deviation near 0.02 and no smoothing
        (no bias): the layout for ``load_format: dummy``."""
        dev = generator.device
        groups = self.qzeros.shape[0]
        u = torch.randint(1, 9, (groups, self.out_features), device=dev, generator=generator)
        w8_std = float((torch.arange(1, 9.0) ** 2).mean().sqrt()) * ((16 ** 2 - 1) / 12) ** 0.5
        return {"qweight": torch.randint(-2**31, 2**31 - 1, self.qweight.shape, dtype=torch.int32,
                                         device=dev, generator=generator),
                "qzeros": torch.full(self.qzeros.shape, 8, dtype=torch.uint8, device=dev),
                "qscales": u.to(torch.int8),
                "scales": torch.full((self.out_features,), 0.02 / w8_std, dtype=torch.float16,
                                     device=dev),
                "smooth": torch.ones(self.in_features, dtype=torch.float16, device=dev)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = ops.dgq_linear(x.reshape(-1, self.in_features), self.qweight, self.qzeros,
                             self.qscales, self.scales, self.smooth, self.group_size, self.bias)
        return out.view(*shape[:-1], self.out_features)


def dgq_dense_weight(tensors: dict[str, torch.Tensor], config: DGQConfig) -> torch.Tensor:
    """The float32 ``[out, in]`` weight of a DGQ linear without its activation quantization."""
    return dense_weight_ref(tensors["qweight"], tensors["qzeros"], tensors["qscales"],
                            tensors["scales"], tensors["smooth"], config.group_size).t()
