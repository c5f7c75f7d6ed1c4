"""The DGQ quantizer for one linear layer (Zhang et al., 2023, "Dual Grained Quantization:
Efficient Fine-Grained Quantization for LLM", arXiv 2310.04836): A8W4 with INT4 group weights
whose group scales are integer multiples of a float per-channel scale, so they dequantize to
INT8 and the product runs as one INT8 GEMM (format and inference in :mod:`optgptq_kernels.dgq`).

For a weight ``W [N, K]`` (rows = output channels) and calibration inputs ``X [T, K]``:

1. Percentile-clipping smoothing. ``a_k = max_t |X[t, k]|``; ``c`` is the ``clip_percentile``-th
   percentile of ``a`` over the input channels; channels above it are scaled down to it:
   ``t_k = max(a_k / c, 1)`` (rounded to float16, as stored). The layer divides its input by
   ``t`` before the per-token INT8 quantization and ``W`` is quantized as ``W' = W * t``, so the
   outlier channels are clipped to the percentile for the activations without losing them: the
   factor moves into the weights. ``clip_percentile = 100`` turns it off.
2. The error of a candidate ``Q`` is the output error on the smoothed calibration inputs,
   ``||X' W'^T - X' Q^T||^2 / T = sum_n e_n H e_n^T`` with ``e = W' - Q``, ``X' = X / t`` and
   ``H = X'^T X' / T`` (rows are independent, so every row picks its own candidate).
3. Phase 1, fine-grained (group) scales: for each group of ``group_size`` input columns and each
   ratio ``r`` of ``fine_grid`` ratios evenly from 1 down to ``fine_min_ratio``, asymmetric
   INT4 over the clipped range ``[r min w, r max w]``: ``s = r (max w - min w) / 15``, zero
   ``z = round(-r min w / s)`` in ``[0, 15]``, ``q = clamp(round(w / s) + z, 0, 15)``; keep per
   row and group the ``(s, z)`` of least group output error (``H`` restricted to the group).
4. Phase 2, coarse-grained (channel) scale: for each ratio ``r`` of ``coarse_grid`` ratios from 1
   down to ``coarse_min_ratio``, ``s_c = r max_k |W'[n, k]| / 127`` (float16) and integer group
   scales ``u = clamp(round(s / s_c), 1, 127)``; codes are re-chosen on the grid ``s_c u`` with
   the phase-1 zero, limited so that ``u (q - z)`` stays in ``[-127, 127]``:
   ``q = clamp(round(w / (s_c u)) + z, max(z - floor(127 / u), 0), min(z + floor(127 / u), 15))``;
   keep per row the ``s_c`` of least output error over the whole row.

Searching the two scales jointly would cost the product of the grids; in two phases it is their
sum. As in the paper, there is no GPTQ-style error feedback: the scales come from the grid
searches and the codes are rounded to nearest. The defaults (grids of 20 and 80 points down to
0.8 and 0.2, 99.5th percentile) are those of the authors' released code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optgptq.compress.quant.solver import Result, one_thread
from optgptq_kernels.dgq import dgq_linear_ref, group_width, num_groups, pack_codes

_MIN_SCALE = 2.0 ** -14    # float16's smallest normal number


@dataclass(frozen=True)
class DGQSpec:
    """DGQ settings (module docstring); all are recorded in the checkpoint's config."""

    group_size: int = 128
    clip_percentile: float = 99.5
    fine_grid: int = 20
    fine_min_ratio: float = 0.8
    coarse_grid: int = 80
    coarse_min_ratio: float = 0.2

    def __post_init__(self) -> None:
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be a positive int or -1 (one group per row), "
                             f"got {self.group_size}")
        if not 0 < self.clip_percentile <= 100:
            raise ValueError(f"clip_percentile must lie in (0, 100], got {self.clip_percentile}")
        for name in ("fine_grid", "coarse_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("fine_min_ratio", "coarse_min_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in (0, 1], got {getattr(self, name)}")

    @property
    def bits(self) -> int:
        """Weight bits: always 4 (A8W4)."""
        return 4

    def check_shape(self, in_features: int, out_features: int) -> None:
        """``ValueError`` unless a linear of this shape packs into the DGQ layout."""
        if in_features % 8:
            raise ValueError(f"dgq: {in_features} input features; 4-bit codes pack 8 to a "
                             f"word, so it must be a multiple of 8")

    def quantization_config(self, method: str = "dgq") -> dict:
        """config.json's ``quantization_config`` of a DGQ checkpoint."""
        return {"quant_method": "dgq", "bits": self.bits, "act_bits": 8,
                "group_size": self.group_size, "sym": False, "act_granularity": "per_token",
                "clip_percentile": self.clip_percentile, "fine_grid": self.fine_grid,
                "fine_min_ratio": self.fine_min_ratio, "coarse_grid": self.coarse_grid,
                "coarse_min_ratio": self.coarse_min_ratio, "checkpoint_format": "dgq",
                "lm_head": False, "meta": {"quantizer": [f"optgptq:{method}"]}}


@dataclass
class DGQResult(Result):
    """One quantized weight ``[N, K]``: ``codes`` ``[N, K]``, ``zeros`` ``[G, N]`` uint8,
    ``qscales`` ``[G, N]`` int8, ``scales`` ``[N]`` and ``smooth`` ``[K]`` float16, the weight
    ``s_c u (q - z) / t`` it applies to unquantized inputs, and the output error estimate."""

    ROW_DIMS = {"codes": 0, "zeros": 1, "qscales": 1, "scales": 0, "weight": 0}

    codes: torch.Tensor
    zeros: torch.Tensor
    qscales: torch.Tensor
    scales: torch.Tensor
    smooth: torch.Tensor
    weight: torch.Tensor
    loss: float

    def tensors(self) -> dict[str, torch.Tensor]:
        """The linear's checkpoint tensors (without bias), layout of :mod:`optgptq_kernels.dgq`."""
        return {"qweight": pack_codes(self.codes.t()), "qzeros": self.zeros.contiguous(),
                "qscales": self.qscales.contiguous(), "scales": self.scales.contiguous(),
                "smooth": self.smooth.clone()}


def served_output(result: DGQResult, spec: DGQSpec, x: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """What the served A8W4 layer outputs for ``x [..., K]`` (per-token INT8 activations,
    :func:`optgptq_kernels.dgq.dgq_linear_ref`)."""
    t = result.tensors()
    y = dgq_linear_ref(x.reshape(-1, x.shape[-1]), t["qweight"], t["qzeros"], t["qscales"],
                       t["scales"], t["smooth"], spec.group_size, bias)
    return y.view(*x.shape[:-1], y.shape[-1])


def smoothing(absmax: torch.Tensor, percentile: float) -> torch.Tensor:
    """Step 1: the float16-exact divisors ``t >= 1`` from per-channel input maxima."""
    c = torch.quantile(absmax.double(), percentile / 100).float()
    if c <= 0:
        return torch.ones_like(absmax)
    return (absmax / c).clamp(1, 65504).half().float()


def _row_error(e: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    return ((e @ H) * e).sum(1)


def _ratios(points: int, lowest: float) -> torch.Tensor:
    return torch.linspace(1.0, lowest, points) if points > 1 else torch.ones(1)


def _grouped(W: torch.Tensor, H: torch.Tensor, spec: DGQSpec
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``W [N, K]`` as ``[N, G, width]`` and ``H`` to match, a short last group padded with
    zeros (zero weights that quantize exactly, so they add no error)."""
    n, k = W.shape
    width, groups = group_width(k, spec.group_size), num_groups(k, spec.group_size)
    pad = groups * width - k
    return (torch.nn.functional.pad(W, (0, pad)).view(n, groups, width),
            torch.nn.functional.pad(H, (0, pad, 0, pad)))


def fine_search(W: torch.Tensor, H: torch.Tensor, spec: DGQSpec
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 1: group scales ``[G, N]`` (float32) and zeros ``[G, N]`` of ``W [N, K]``, all
    groups at once."""
    Wg, Hp = _grouped(W, H, spec)
    width = Wg.shape[2]
    Hg = torch.stack([Hp[g * width:(g + 1) * width, g * width:(g + 1) * width]
                      for g in range(Wg.shape[1])])
    lo, hi = Wg.amin(2, keepdim=True), Wg.amax(2, keepdim=True)            # [N, G, 1]
    best = torch.full(lo.shape, float("inf"))
    scales, zeros = torch.empty_like(lo), torch.empty_like(lo)
    for r in _ratios(spec.fine_grid, spec.fine_min_ratio).tolist():
        s = ((hi - lo) * r / 15).clamp(min=_MIN_SCALE)
        z = torch.round(-lo * r / s).clamp(0, 15)
        e = Wg - s * (torch.clamp(torch.round(Wg / s) + z, 0, 15) - z)
        err = (torch.einsum("ngw,gwv->ngv", e, Hg) * e).sum(2, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        scales = torch.where(better, s, scales)
        zeros = torch.where(better, z, zeros)
    return scales[:, :, 0].t().contiguous(), zeros[:, :, 0].t().contiguous()


def coarse_search(W: torch.Tensor, H: torch.Tensor, fine: torch.Tensor, zeros: torch.Tensor,
                  spec: DGQSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase 2: channel scales ``[N]``, integer group scales ``[G, N]``, codes ``[N, K]`` and
    each row's output error."""
    n, k = W.shape
    Wg, Hp = _grouped(W, H, spec)
    z = zeros.t()[:, :, None]                                     # [N, G, 1]
    amax = W.abs().amax(1)
    best = torch.full((n,), float("inf"))
    best_sc, best_u, best_d = torch.empty(n), torch.empty_like(fine), torch.empty_like(Wg)
    for r in _ratios(spec.coarse_grid, spec.coarse_min_ratio).tolist():
        s_c = (amax * r / 127).clamp(min=_MIN_SCALE).half().float()
        u = torch.round(fine / s_c).clamp(1, 127)                  # [G, N]
        lim = torch.floor(127 / u).t()[:, :, None]
        step = (u * s_c).t()[:, :, None]
        # d = q - z with q = clamp(round(w / step) + z, max(z - lim, 0), min(z + lim, 15))
        d = torch.clamp(torch.round(Wg / step), torch.maximum(-lim, -z), torch.minimum(lim, 15 - z))
        err = _row_error((Wg - step * d).view(n, -1), Hp)
        better = err < best
        best = torch.where(better, err, best)
        best_sc = torch.where(better, s_c, best_sc)
        best_u = torch.where(better, u, best_u)
        best_d = torch.where(better[:, None, None], d, best_d)
    codes = (best_d + z).view(n, -1)[:, :k]
    return best_sc, best_u, codes, best


class DGQ:
    """Input statistics and solver for the linears reading one input of ``in_features``."""

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.XtX = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.absmax = torch.zeros(in_features)
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Fold the input rows ``x [..., in_features]`` into the statistics."""
        x = x.reshape(-1, self.in_features).float()
        self.XtX += (x.t() @ x).double()
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.nsamples += x.shape[0]

    def quantize(self, weight: torch.Tensor, spec: DGQSpec) -> DGQResult:
        """Quantize ``weight [N, in_features]`` (module docstring).

        Runs on one thread: the searches are many mid-sized ops, which thread hand-offs slow
        down several-fold on a busy CPU (as for GPTQ's solver)."""
        if self.nsamples == 0:
            raise ValueError("DGQ.quantize: no calibration inputs were added")
        with one_thread():
            return self._quantize(weight, spec)

    def _quantize(self, weight: torch.Tensor, spec: DGQSpec) -> DGQResult:
        t = smoothing(self.absmax, spec.clip_percentile)
        H = (self.XtX / self.nsamples / torch.outer(t, t).double()).float()
        W = weight.detach().float() * t[None, :]
        fine, zeros = fine_search(W, H, spec)
        s_c, u, q, err = coarse_search(W, H, fine, zeros, spec)
        gk = torch.arange(W.shape[1]) // group_width(W.shape[1], spec.group_size)
        w8 = u.t()[:, gk] * (q - zeros.t()[:, gk])
        assert int(w8.abs().max()) <= 127, "DGQ INT8 weight out of range"
        return DGQResult(q.to(torch.uint8), zeros.to(torch.uint8), u.to(torch.int8),
                         s_c.half(), t.half(), w8 * s_c[:, None] / t[None, :], float(err.sum()))
