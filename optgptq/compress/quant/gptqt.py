"""GPTQT (Guo, Lang, Ren, 2024, arXiv 2407.02891): GPTQ into binary coding, quantizing twice.

GPTQT stores a weight as ``bits`` (3 or 2) binary-coding planes, ``w = offset + sum_i alpha_i
b_i`` with ``b_i`` in ``{-1, +1}`` per group and output row (layout in
:mod:`optgptq_kernels.bcq`). Fitting binary coding to the float weights directly overfits the
weights; GPTQT gets there in two steps and lets GPTQ's error feedback see the result:

1. Linear quantization to a higher, *intermediate* bit width ``n`` (``intermediate_bits``): per
   group and row, the grid ``start + s q``, ``q`` in ``[0, 2**n - 1]``, spanning the group's
   ``[min, max]`` scaled about its centre by a factor ``m`` (step 3): ``s = m (max - min) /
   (2**n - 1)``, ``start = (max + min) / 2 - m (max - min) / 2``.
2. Binary coding of those integers: the ``2**bits`` levels must be points of the integer grid,
   ``base + sum_i d_i t_i`` (``t_i`` in ``{0, 1}``, integers ``d_1 >= .. >= d_bits >= 1``,
   ``base >= 0``, top level ``<= 2**n - 1``), i.e. ``alpha_i = s d_i / 2`` and ``offset = start
   + s (base + sum_i d_i / 2)``. Every such candidate is tried (441 for n=4, 3 planes; 7225
   for n=5) against the histogram of the group's integer codes weighted by the Hessian diagonal
   ``H[k, k]`` (the input's energy): the error of a candidate for a row is ``sum_v hist[v]
   (v - nearest level)**2``, one matrix product over all rows and candidates.
3. Re-explore: steps 1-2 run for every initial scale factor ``m`` in ``explore`` (``steps``
   values evenly spaced in ``[lo, hi]``; the plain min-max grid is ``m = 1``) and each row keeps
   the ``m`` whose binary coding reconstructs the group's float weights best in the
   Hessian-weighted norm ``sum_k H[k, k] (w_k - w^_k)**2``.

At inference the two steps are one: only ``alphas`` and ``offsets`` (rounded to float16) are
stored, and a weight's value is the level of its code. The GPTQ loop
(:mod:`optgptq.compress.quant.gptq`) runs with that binary coding as its quantizer: a group's levels
are fitted (steps 1-3) when its first column is reached, from the columns as updated so far;
each column is then rounded to its row's nearest level and the rounding error is spread over
the columns not yet quantized (lazy block updates, dampening ``damp``, ``block_size`` as in
GPTQ). Columns go in their natural order (no act-order), so groups are ``k // group_size``.

Parameters (``GPTQTSpec``): ``bits`` 3 or 2; ``intermediate_bits`` (default ``bits + 2``, at
most 5: the candidate count grows as ``2**(n * bits)``); ``explore`` (default ``(0.7, 1.1, 9)``);
``group_size`` (a multiple of 32 or -1, default 64); ``damp`` (0.01); ``block_size`` (128). Only
the paper's abstract was at hand when this was written: the grid-aligned exhaustive search of
step 2 and the Hessian-weighted criteria of steps 2-3 are this project's reading of it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from optgptq.compress.quant.gptq import GPTQ, inverse_cholesky
from optgptq.compress.quant.solver import Result, check_loop_settings, one_thread
from optgptq_kernels.bcq import check_layout, group_width, levels, num_groups, pack_planes

MAX_INTERMEDIATE_BITS = 5   # 3 planes on a 6-bit grid would be 116281 candidates per group


@dataclass(frozen=True)
class GPTQTSpec:
    """GPTQT's settings (module docstring): ``bits`` planes fitted on an ``intermediate_bits``
    grid (default ``bits + 2``), re-explored over ``explore = (lo, hi, steps)`` scale factors."""

    bits: int = 3
    intermediate_bits: int | None = None
    group_size: int = 64
    explore: tuple[float, float, int] = (0.7, 1.1, 9)
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        check_layout(self.bits, 32, self.group_size)
        if self.intermediate_bits is None:
            object.__setattr__(self, "intermediate_bits", self.bits + 2)
        if not self.bits < self.intermediate_bits <= MAX_INTERMEDIATE_BITS:
            raise ValueError(f"intermediate_bits must lie in [{self.bits + 1}, "
                             f"{MAX_INTERMEDIATE_BITS}] (above the {self.bits} planes: the "
                             f"binary coding picks {1 << self.bits} of its levels), got "
                             f"{self.intermediate_bits}")
        lo, hi, steps = self.explore
        if not (0 < lo <= hi and isinstance(steps, int) and steps >= 1
                and (steps > 1 or lo == hi)):
            raise ValueError(f"explore must be (lo, hi, steps) with 0 < lo <= hi and steps >= 1 "
                             f"(steps = 1 only when lo = hi), got {self.explore}")
        check_loop_settings(self.damp, self.block_size)

    @property
    def multipliers(self) -> list[float]:
        lo, hi, steps = self.explore
        return torch.linspace(lo, hi, steps).tolist()

    def check_shape(self, in_features: int, out_features: int) -> None:
        """``ValueError`` unless a linear of this shape fits the binary-coded layout."""
        check_layout(self.bits, in_features, self.group_size)

    def quantization_config(self, method: str = "gptqt") -> dict:
        """config.json's ``quantization_config`` of a GPTQT checkpoint."""
        return {"quant_method": "gptqt", "bits": self.bits, "group_size": self.group_size,
                "intermediate_bits": self.intermediate_bits, "explore": list(self.explore),
                "damp_percent": self.damp, "desc_act": False, "true_sequential": True,
                "lm_head": False, "meta": {"quantizer": [f"optgptq:{method}"]}}


@dataclass
class BCQResult(Result):
    """One quantized weight ``[N, K]``: ``codes`` ``[N, K]`` (uint8, bit ``i`` = plane ``i``),
    ``alphas`` ``[G, bits, N]`` and ``offsets`` ``[G, N]`` (float32 holding float16 values), the
    dequantized ``weight`` and the solver's loss (sum of squared output-error estimates)."""

    ROW_DIMS = {"codes": 0, "alphas": 2, "offsets": 1, "weight": 0}

    codes: torch.Tensor
    alphas: torch.Tensor
    offsets: torch.Tensor
    weight: torch.Tensor
    loss: float

    def tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint tensors, layout of :mod:`optgptq_kernels.bcq`."""
        bits = self.alphas.shape[1]
        return {"planes": pack_planes(self.codes.t(), bits), "alphas": self.alphas.half(),
                "offsets": self.offsets.half()}


@functools.cache
def _candidates(bits: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every grid-aligned binary coding (step 2): ``(base, d)`` ``[C, 1 + bits]``, its integer
    level per code ``[C, 2**bits]`` and each grid point's squared distance to its nearest level
    ``[C, 2**n]``."""
    top = (1 << n) - 1
    rows: list[list[int]] = []

    def steps(prefix: list[int], largest: int, room: int) -> None:
        if len(prefix) == bits:
            rows.extend([base, *prefix] for base in range(top - sum(prefix) + 1))
            return
        for d in range(1, min(largest, room) + 1):
            steps(prefix + [d], d, room - d)

    steps([], top, top)
    params = torch.tensor(rows, dtype=torch.float32)
    code_bits = (torch.arange(1 << bits).view(-1, 1) >> torch.arange(bits)) & 1
    lv = params[:, :1] + params[:, 1:] @ code_bits.t().float()           # [C, 2**bits]
    grid = torch.arange(top + 1, dtype=torch.float32)
    dist = (grid.view(1, -1, 1) - lv.unsqueeze(1)).square().amin(2)       # [C, 2**n]
    return params, lv, dist


def _nearest(w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Codes of the nearest levels: ``w [N, C]`` against ``table [N, 2**bits]``."""
    return (w.unsqueeze(2) - table.unsqueeze(1)).abs().argmin(2)


def fit_group(w: torch.Tensor, h: torch.Tensor,
              spec: GPTQTSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-3 for one group: ``alphas [bits, N]`` and ``offsets [N]`` (float32 holding float16
    values) for weights ``w [N, C]`` with Hessian diagonal ``h [C]``."""
    params, _, dist = _candidates(spec.bits, spec.intermediate_bits)
    maxq = (1 << spec.intermediate_bits) - 1
    n_out = w.shape[0]
    lo, hi = w.min(1).values, w.max(1).values
    centre, half = (hi + lo) / 2, ((hi - lo) / 2).clamp(min=1e-6)
    weights = h.expand_as(w)
    best_err = torch.full((n_out,), math.inf)
    alphas, offsets = torch.zeros(spec.bits, n_out), torch.zeros(n_out)
    for m in spec.multipliers:
        scale, start = 2 * half * m / maxq, centre - half * m
        q = torch.clamp(torch.round((w - start.unsqueeze(1)) / scale.unsqueeze(1)), 0, maxq)
        hist = torch.zeros(n_out, maxq + 1).scatter_add_(1, q.long(), weights)
        choice = torch.cat([(part @ dist.t()).argmin(1) for part in hist.split(128)])
        base, d = params[choice, 0], params[choice, 1:]                 # [N], [N, bits]
        a = (scale.unsqueeze(1) * d / 2).half().float()
        o = (start + scale * (base + d.sum(1) / 2)).half().float()
        table = levels(a.t().unsqueeze(0), o.unsqueeze(0))[0]           # [N, 2**bits]
        recon = table.gather(1, _nearest(w, table))
        err = ((w - recon).square() * weights).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        alphas[:, better], offsets[better] = a.t()[:, better], o[better]
    return alphas, offsets


class GPTQT(GPTQ):
    """The GPTQ Hessian accumulator whose ``quantize`` runs the GPTQT solver."""

    def quantize(self, weight: torch.Tensor,  # type: ignore[override]
                 spec: GPTQTSpec) -> BCQResult:
        if self.H is None or self.nsamples == 0:
            raise ValueError("GPTQT.quantize: no calibration inputs were added")
        H, self.H = self.H, None
        return solve(weight, H, spec)


def solve(weight: torch.Tensor, H: torch.Tensor, spec: GPTQTSpec) -> BCQResult:
    """The GPTQ loop with the binary-coding quantizer (module docstring) on ``weight [N, K]``
    with Hessian ``H [K, K]``; one thread, as :func:`optgptq.compress.quant.gptq.solve`."""
    with one_thread():
        return _solve(weight, H, spec)


def _solve(weight: torch.Tensor, H: torch.Tensor, spec: GPTQTSpec) -> BCQResult:
    W = weight.detach().float().clone()
    n_out, k = W.shape
    check_layout(spec.bits, k, spec.group_size)
    H = H.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    h_diag = H.diagonal().clone()
    Hinv = inverse_cholesky(H, spec.damp)
    gs, groups = group_width(k, spec.group_size), num_groups(k, spec.group_size)
    block = gs if gs >= spec.block_size else spec.block_size // gs * gs

    alphas, offsets = torch.zeros(groups, spec.bits, n_out), torch.zeros(groups, n_out)
    codes, Q = torch.zeros(n_out, k, dtype=torch.long), torch.zeros_like(W)
    loss = torch.zeros(())
    table = torch.empty(0)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(n_out, i2 - i1), Hinv[i1:i2, i1:i2]
        diag = Hinv1.diagonal().tolist()
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:
                g = col // gs
                alphas[g], offsets[g] = fit_group(W1[:, i:i + gs], h_diag[col:col + gs], spec)
                table = levels(alphas[g:g + 1], offsets[g:g + 1])[0]
            w = W1[:, i]
            code = _nearest(w.unsqueeze(1), table)
            codes[:, col], Q[:, col] = code[:, 0], table.gather(1, code)[:, 0]
            err = (w - Q[:, col]) / diag[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        loss += Err1.square().sum() / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    assert math.isfinite(float(loss)), "GPTQT loss is not finite"
    return BCQResult(codes.to(torch.uint8), alphas, offsets, Q, float(loss))
