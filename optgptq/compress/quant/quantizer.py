"""Quantization settings and the per-group min/max quantizer GPTQ and round-to-nearest share.

A group of weights ``w`` (one output row, the input columns of one group) is stored as integer
codes ``q`` in ``[0, 2**bits - 1]`` with a scale ``s`` and an integer zero point ``z``, and stands
for ``s * (q - z)``:

- asymmetric (``sym=False``): the range ``[min(w, 0), max(w, 0)]`` is spread over the codes,
  ``s = (hi - lo) / maxq``, ``z = round(-lo / s)``. The checkpoint stores ``z - 1`` (the
  ``checkpoint_format: gptq`` convention), which cannot hold ``z = 0``, so ``z`` is at least 1;
- symmetric (``sym=True``): ``hi = max(|min w|, |max w|)``, ``lo = -hi`` and ``z = 2**(bits-1)``.

A row of zeros gets the range ``[-1, 1]``. Scales are rounded to float16 (the checkpoint's
dtype) before the codes are chosen, so ``s * (q - z)`` here is exactly what a loader computes.

Clipping search (``mse=True``, the original GPTQ code's ``mse`` option): the range is shrunk by
each factor ``p = 1 - i / MSE_GRID`` for ``i < MSE_MAX_SHRINK * MSE_GRID`` (``[p lo, p hi]``),
and each row keeps the factor whose round-to-nearest values ``s (q - z)`` have the smallest
``sum |s (q - z) - w| ** MSE_NORM``; ``p = 1`` is a candidate, so that error never grows. Clipping
a few outliers buys a finer step for the rest of the group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optgptq.compress.quant.solver import check_loop_settings
from optgptq_kernels.gptq import SUPPORTED_BITS

_MIN_SCALE = 1e-5   # well inside float16's normal range
MSE_GRID, MSE_MAX_SHRINK, MSE_NORM = 100, 0.8, 2.4
# Rows per search step: their [P, rows, C] candidates stay in cache (2.9x faster than all rows
# at once for a 3072 x 64 group on the 2-core CI machine).
MSE_ROWS = 32


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: see :mod:`optgptq.compress.quant.gptq` for the GPTQ-specific fields.
    The settings of methods ``gptq`` and ``rtn``."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    desc_act: bool = True
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    mse: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be a positive int or -1 (one group per row), "
                             f"got {self.group_size}")
        check_loop_settings(self.damp, self.block_size)

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        return -(-in_features // self.group_width(in_features))

    def check_shape(self, in_features: int, out_features: int) -> None:
        """``ValueError`` unless a linear of this shape fills whole 32-bit words with codes
        along both dimensions."""
        if in_features * self.bits % 32 or out_features * self.bits % 32:
            raise ValueError(f"bits={self.bits}: {in_features} in, {out_features} out features "
                             f"cannot be packed into 32-bit words (for 3 bits both must be "
                             f"multiples of 32)")

    def quantization_config(self, method: str = "gptq") -> dict:
        """config.json's ``quantization_config`` of a ``method`` (``gptq`` or ``rtn``)
        checkpoint. ``desc_act`` says the groups follow a permuted order (``g_idx`` is not
        ``k // group_size``): never for round-to-nearest, nor with ``static_groups``, whose
        act-order keeps the original groups (what vLLM calls static activation ordering: it
        loads those, and refuses ``desc_act`` with groups since 0.32)."""
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
                "desc_act": self.desc_act and method == "gptq" and not self.static_groups,
                "sym": self.sym,
                "checkpoint_format": "gptq", "static_groups": self.static_groups,
                "damp_percent": self.damp, "true_sequential": True, "lm_head": False,
                "meta": {"quantizer": [f"optgptq:{method}"],
                         "mse": MSE_NORM if self.mse else 0.0}}


def find_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale (float32 holding float16 values) and integer zero (as float) for ``w [N, C]``."""
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    if spec.sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    if not spec.mse:
        return _scale_zero(lo, hi, spec)
    w = w.contiguous()  # the candidates' error sums then run along memory, whatever w's layout
    shrink = 1 - torch.arange(int(MSE_MAX_SHRINK * MSE_GRID), device=w.device) / MSE_GRID
    scale, zero = _scale_zero(shrink[:, None] * lo, shrink[:, None] * hi, spec)  # [P, N]
    best = torch.cat([_best_candidate(w[r:r + MSE_ROWS], scale[:, r:r + MSE_ROWS],
                                      zero[:, r:r + MSE_ROWS], spec.maxq)
                      for r in range(0, w.shape[0], MSE_ROWS)])                   # [N]
    rows = torch.arange(w.shape[0], device=w.device)
    return scale[best, rows], zero[best, rows]


def _best_candidate(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    maxq: int) -> torch.Tensor:
    """Per row of ``w [n, C]``, the candidate ``p`` of ``scale, zero [P, n]`` with the least
    ``sum |s (q - z) - w| ** MSE_NORM``."""
    _, deq = quantize_column(w, scale[..., None], zero[..., None], maxq)          # [P, n, C]
    # |e| ** MSE_NORM as exp(MSE_NORM log |e|): equal to ~1e-6, 4x faster than pow on CPU
    return (deq - w).abs_().log_().mul_(MSE_NORM).exp_().sum(dim=2).argmin(dim=0)


def _scale_zero(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec
                ) -> tuple[torch.Tensor, torch.Tensor]:
    scale = ((hi - lo) / spec.maxq).clamp(min=_MIN_SCALE).half().float()
    if spec.sym:
        zero = torch.full_like(scale, float(1 << (spec.bits - 1)))
    else:
        zero = torch.round(-lo / scale).clamp(1, spec.maxq)
    return scale, zero


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and their dequantized values for a column of weights ``w [N]`` (or a block
    ``[N, C]`` with ``scale``/``zero`` shaped ``[N, 1]``)."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return q, scale * (q - zero)
