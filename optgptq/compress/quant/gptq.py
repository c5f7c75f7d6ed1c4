"""The GPTQ solver for one linear layer (Frantar et al., 2022), after the authors' reference code.

GPTQ quantizes a weight ``W [N_out, K_in]`` column by column (input feature by input feature)
and, after each column, moves the rounding error onto the columns not yet quantized so that the
layer's output on the calibration inputs ``X`` changes as little as possible — it minimises
``||W X - Q X||²`` greedily, one column at a time, using the inverse Hessian of that loss:

1. ``add_batch`` accumulates ``H = 2 XᵀX / n`` over all calibration tokens (``X`` the layer's
   input rows; a running mean, so batches may come in any size). ``H`` is symmetric, so only
   its blocks on and below the diagonal are multiplied (blocks of ``hessian_block(K)`` columns)
   and mirrored: ~60% of a full ``XᵀX``'s work (1.36x faster at K = 576, 1.5x at 1536 on the
   2-core CI machine).
2. ``quantize``: columns whose input is always zero ("dead", ``H[k, k] = 0``) get weight 0 and
   ``H[k, k] = 1``. With act-order (``desc_act``) columns are processed by decreasing ``H[k, k]``
   (the most active inputs first, while there is most freedom left to absorb their error).
   Dampening adds ``damp x mean(diag H)`` to the diagonal (``damp`` is the reference code's
   ``percdamp``; it is raised ten-fold, at most twice, if ``H`` is still not positive definite).
   The upper Cholesky factor ``U`` of ``H⁻¹`` gives each step's error propagation row.
3. For each column ``k``: quantize ``W[:, k]`` with its group's scale/zero
   (:mod:`optgptq.compress.quant.quantizer`), ``err = (W[:, k] - Q[:, k]) / U[k, k]``, and update
   the remaining columns ``W[:, j] -= err * U[k, j]``. Updates are *lazy*: inside a block of
   ``block_size`` columns (128) they are applied at once per column, to the rest of the matrix
   once per block (one matmul) — the same result with far less memory traffic.
4. Groups (``group_size`` input columns share a scale and zero per output row; ``-1`` means one
   group per row; a size that does not divide ``K`` leaves a short last group): a group's
   parameters are chosen when its first column is reached, from the group's columns as updated
   so far (blocks are aligned to whole groups so all of them are up to date). With act-order the
   groups are consecutive runs of the *permuted* order, so ``g_idx[k]`` (the group of input row
   ``k`` in the checkpoint) is no longer ``k // group_size``. ``static_groups`` instead fixes all
   group parameters up front from the original weights, in the original column order
   (``g_idx = k // group_size`` even with act-order).

Rows are independent given ``H``, so layers that read the same input (q/k/v, gate/up) are solved
as one stacked weight. Round-to-nearest is the same loop with ``H = I`` (no error feedback).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from optgptq.compress.quant.quantizer import QuantSpec, find_params, quantize_column
from optgptq.compress.quant.solver import Result, one_thread
from optgptq_kernels.gptq import pack_cols, pack_rows


@dataclass
class QuantResult(Result):
    """One quantized weight ``[N, K]``: codes ``[N, K]`` (uint8, original column order),
    ``scales`` ``[G, N]`` (float32 holding float16 values), integer ``zeros`` ``[G, N]``, ``g_idx``
    ``[K]`` int32, the dequantized ``weight`` ``[N, K]``, the solver's loss (sum of squared
    output-error estimates; 0 for round-to-nearest) and the code width ``bits``."""

    ROW_DIMS = {"codes": 0, "scales": 1, "zeros": 1, "weight": 0}

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    weight: torch.Tensor
    loss: float
    bits: int

    def tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint tensors, layout of :mod:`optgptq_kernels.gptq` (zeros stored minus
        one)."""
        return {"qweight": pack_rows(self.codes.t(), self.bits),
                "qzeros": pack_cols(self.zeros - 1, self.bits),
                "scales": self.scales.half(),
                "g_idx": self.g_idx.int().clone()}


class GPTQ:
    """Hessian accumulator and solver for the layers reading one input of ``in_features``."""

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.H: torch.Tensor | None = torch.zeros(in_features, in_features)
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Fold the input rows ``x [..., in_features]`` into ``H = 2 XᵀX / n``."""
        assert self.H is not None, "add_batch after quantize"
        x = x.reshape(-1, self.in_features).float()
        total = self.nsamples + x.shape[0]
        add_gram_(self.H, x, beta=self.nsamples / total, alpha=2.0 / total)
        self.nsamples = total

    def quantize(self, weight: torch.Tensor, spec: QuantSpec) -> QuantResult:
        """Quantize ``weight [N, in_features]`` against the accumulated Hessian (consumes it)."""
        if self.H is None or self.nsamples == 0:
            raise ValueError("GPTQ.quantize: no calibration inputs were added")
        H, self.H = self.H, None
        return solve(weight, H, spec)


class RTN:
    """Round-to-nearest as a solver: no input statistics, :func:`rtn` on the weight."""

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features

    def add_batch(self, x: torch.Tensor) -> None:
        """Round-to-nearest reads no inputs."""

    def quantize(self, weight: torch.Tensor, spec: QuantSpec) -> QuantResult:
        return rtn(weight, spec)


def hessian_block(k: int) -> int:
    """Column block of the symmetric update: about a sixth of ``k``, in multiples of 64, at
    least 192 (smaller blocks make GEMMs too thin to pay for the saved work)."""
    return max(192, 64 * round(k / 384))


def add_gram_(H: torch.Tensor, x: torch.Tensor, beta: float, alpha: float) -> None:
    """``H = beta H + alpha xᵀx`` for a symmetric ``H``: the lower blocks, mirrored."""
    k = x.shape[1]
    b = hessian_block(k)
    for i in range(0, k, b):
        for j in range(0, i + 1, b):
            block = H[i:i + b, j:j + b]
            block.addmm_(x[:, i:i + b].t(), x[:, j:j + b], beta=beta, alpha=alpha)
            if j != i:
                H[j:j + b, i:i + b] = block.t()


def rtn(weight: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """Round-to-nearest with the same groups and packing as GPTQ (no error feedback): what
    :func:`solve` gives with a diagonal Hessian, computed a group at a time."""
    W = weight.detach().float()
    n_out, k = W.shape
    gs, groups = spec.group_width(k), spec.num_groups(k)
    scales, zeros = torch.zeros(groups, n_out), torch.zeros(groups, n_out)
    codes, Q = torch.zeros_like(W), torch.zeros_like(W)
    for g in range(groups):
        cols = slice(g * gs, (g + 1) * gs)
        scales[g], zeros[g] = find_params(W[:, cols], spec)
        codes[:, cols], Q[:, cols] = quantize_column(W[:, cols], scales[g].unsqueeze(1),
                                                     zeros[g].unsqueeze(1), spec.maxq)
    g_idx = (torch.arange(k) // gs).int()
    return QuantResult(codes.to(torch.uint8), scales, zeros.long(), g_idx, Q, 0.0, spec.bits)


def inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the inverse of the dampened ``H``."""
    mean_diag = H.diagonal().mean()
    for attempt in range(3):
        Hd = H.clone()
        Hd.diagonal().add_(damp * 10 ** attempt * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Linv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                return Linv
    raise ValueError(f"damp={damp}: the Hessian is not positive definite even with 100x this "
                     f"dampening; raise damp")


def solve(weight: torch.Tensor, H: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """The GPTQ loop (module docstring) on ``weight [N, K]`` with Hessian ``H [K, K]``.

    Runs on one thread: the loop is thousands of small ops, which thread hand-offs slow down
    several-fold on a busy CPU. The clipping search (``spec.mse``, a few large ops per group)
    gets the threads back (1.65x faster on 2 cores, the same result).
    """
    with one_thread() as threads:
        return _solve(weight, H, spec, threads)


def _group_params(w: torch.Tensor, spec: QuantSpec, threads: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`find_params` of ``w [N, C]``, the clipping search on ``threads`` threads."""
    if not spec.mse:
        return find_params(w, spec)
    torch.set_num_threads(threads)
    try:
        return find_params(w, spec)
    finally:
        torch.set_num_threads(1)


def _solve(weight: torch.Tensor, H: torch.Tensor, spec: QuantSpec,
           threads: int = 1) -> QuantResult:
    W = weight.detach().float().clone()
    n_out, k = W.shape
    H = H.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    gs, groups = spec.group_width(k), spec.num_groups(k)
    scales, zeros = torch.zeros(groups, n_out), torch.zeros(groups, n_out)
    perm = (torch.argsort(H.diagonal(), descending=True, stable=True) if spec.desc_act
            else torch.arange(k))
    if spec.static_groups:
        for g in range(groups):
            scales[g], zeros[g] = _group_params(W[:, g * gs:(g + 1) * gs], spec, threads)
        g_idx = torch.arange(k) // gs
    else:
        g_idx = torch.empty(k, dtype=torch.long)
        g_idx[perm] = torch.arange(k) // gs
    W, H = W[:, perm], H[perm][:, perm]
    group_of_col = g_idx[perm]
    Hinv = inverse_cholesky(H, spec.damp)
    block = gs if gs >= spec.block_size else spec.block_size // gs * gs

    # Column-major working copy: column k of W is row k here, so each step reads, quantizes and
    # updates contiguous memory.
    WT = W.t().contiguous()
    codes, Q = torch.zeros(k, n_out), torch.zeros(k, n_out)
    group_list = group_of_col.tolist()
    loss = torch.zeros(())
    scale = zero = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, Err1, Hinv1 = WT[i1:i2].clone(), torch.zeros(i2 - i1, n_out), Hinv[i1:i2, i1:i2]
        diag = Hinv1.diagonal().tolist()
        for i in range(i2 - i1):
            col, g = i1 + i, group_list[i1 + i]
            if not spec.static_groups and col % gs == 0:
                scales[g], zeros[g] = _group_params(W1[i:i + gs].t(), spec, threads)
            if col % gs == 0 or spec.static_groups:
                scale, zero = scales[g], zeros[g]
            w = W1[i]
            codes[col], Q[col] = quantize_column(w, scale, zero, spec.maxq)
            err = (w - Q[col]) / diag[i]
            W1[i + 1:].addcmul_(Hinv1[i, i + 1:].unsqueeze(1), err, value=-1)  # one pass
            Err1[i] = err
        loss += Err1.square().sum() / 2
        WT[i2:] -= (Err1.t() @ Hinv[i1:i2, i2:]).t()

    inv = torch.argsort(perm)
    assert math.isfinite(float(loss)), "GPTQ loss is not finite"
    return QuantResult(codes[inv].t().contiguous().to(torch.uint8), scales, zeros.long(),
                       g_idx.int(), Q[inv].t().contiguous(), float(loss), spec.bits)
