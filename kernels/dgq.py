"""The DGQ A8W4 format and its PyTorch reference: INT4 weights that dequantize to INT8, per-token
INT8 activations, one integer matmul.

DGQ (Dual Grained Quantization, Zhang et al., 2023, arXiv 2310.04836) stores a linear layer
``y = x @ W`` (``W`` of shape ``[K, N]``, in x out features, the transpose of
``nn.Linear.weight``) as:

- ``qweight`` int32 ``[K / 8, N]``: the 4-bit codes ``q`` in ``[0, 15]``, packed along the input
  dimension exactly like 4-bit GPTQ (:func:`optgptq_kernels.gptq.pack_rows`);
- ``qzeros`` uint8 ``[G, N]``: the integer zero point ``z`` in ``[0, 15]`` of each group;
- ``qscales`` int8 ``[G, N]``: the fine-grained (group) scale ``u`` in ``[1, 127]``, an integer;
- ``scales`` float16 ``[N]``: the coarse-grained (per output channel) scale ``s_c``;
- ``smooth`` float16 ``[K]``: per input channel divisors ``t >= 1`` of the activations (DGQ's
  percentile-clipping smoothing; their inverse was multiplied into ``W`` before quantization).

with ``G = ceil(K / group_size)`` groups of ``group_size`` consecutive input rows (the last may
be short; ``group_size = -1`` is one group). Row ``k`` belongs to group ``g = k // group_size``
and its INT8 weight is ``w8[k, n] = u[g, n] * (q[k, n] - z[g, n])``; the quantizer guarantees
``|w8| <= 127``. The layer computes:

1. ``xs = x / t`` (float32), ``s_tok = max(max_k |xs|, 1e-10) / 127`` per row (token) and
   ``x8 = clamp(round(xs / s_tok), -127, 127)`` int8, rounding half away from zero;
2. ``acc = x8 @ w8`` in exact integer arithmetic (int32 accumulators);
3. ``y = (float32(acc) * s_tok) * s_c (+ bias)``, rounded once to ``x``'s dtype.

Every step is specified in float32 operation by operation (correctly rounded divisions), so a
kernel that follows it reproduces this reference bit for bit.
"""

from __future__ import annotations

import torch

from optgptq_kernels.gptq import pack_rows, unpack_rows

BITS = 4
INT8_MAX = 127
MIN_AMAX = 1e-10


def num_groups(k: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-k // group_size)


def group_width(k: int, group_size: int) -> int:
    return k if group_size == -1 else group_size


def check_shapes(qweight: torch.Tensor, qzeros: torch.Tensor, qscales: torch.Tensor,
                 scales: torch.Tensor, smooth: torch.Tensor, group_size: int) -> tuple[int, int]:
    """``(K, N)`` of a DGQ weight; ``ValueError`` if its tensors disagree."""
    k, n = smooth.shape[0], scales.shape[0]
    if group_size != -1 and group_size < 1:
        raise ValueError(f"group_size must be a positive int or -1, got {group_size}")
    if k % 8 or qweight.shape != (k // 8, n) or qweight.dtype != torch.int32:
        raise ValueError(f"qweight must be int32 [{k} / 8, {n}] (K a multiple of 8), got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    groups = num_groups(k, group_size)
    for name, t, dtype in (("qzeros", qzeros, torch.uint8), ("qscales", qscales, torch.int8)):
        if t.shape != (groups, n) or t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype} [{groups}, {n}], got {t.dtype} "
                             f"{tuple(t.shape)}")
    return k, n


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[K, N]`` -> ``qweight`` int32 ``[K / 8, N]``."""
    return pack_rows(codes, BITS)


def int8_weight_ref(qweight: torch.Tensor, qzeros: torch.Tensor, qscales: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """The INT8 weight ``w8 [K, N] = u * (q - z)``; ``ValueError`` if a value leaves int8."""
    k = qweight.shape[0] * 8
    g = torch.arange(k, device=qweight.device) // group_width(k, group_size)
    q = unpack_rows(qweight, BITS, k)
    w = qscales.int()[g] * (q - qzeros.int()[g])
    if int(w.abs().max()) > INT8_MAX:
        raise ValueError("qscales * (codes - qzeros) leaves [-127, 127]: not a valid DGQ weight")
    return w.to(torch.int8)


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties away from zero (as ``roundf``)."""
    r = torch.floor(v.abs() + 0.5)
    return torch.where(v < 0, -r, r)


def quantize_activations_ref(x: torch.Tensor, smooth: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token INT8 ``x8 [M, K]`` and float32 scales ``s_tok [M]`` of ``x / smooth``."""
    xs = x.float() / smooth.float()
    amax = xs.abs().amax(dim=1).clamp(min=MIN_AMAX)
    # divided by a tensor: CUDA turns division by a Python scalar into a multiplication by its
    # rounded reciprocal, which is not the correctly rounded quotient the kernel computes
    s_tok = amax / torch.full_like(amax, INT8_MAX)
    x8 = round_half_away(xs / s_tok[:, None]).clamp(-INT8_MAX, INT8_MAX)
    return x8.to(torch.int8), s_tok


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] @ b [K, N]`` of int8 matrices, exact, as int32.

    On the CPU in float32 slices of 1024 inputs: every partial sum is an integer of magnitude
    at most ``127 * 127 * 1024 < 2**24``, so float32 holds it exactly in any summation order (and
    float32 GEMM is many times faster than integer matmul there). On an accelerator in float64
    (exact below ``2**53``; float32 could be demoted to TF32)."""
    if a.device.type != "cpu":
        return (a.double() @ b.double()).int()
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32)
    for k0 in range(0, a.shape[1], 1024):
        acc += (a[:, k0:k0 + 1024].float() @ b[k0:k0 + 1024].float()).int()
    return acc


def rescale(acc: torch.Tensor, s_tok: torch.Tensor, scales: torch.Tensor,
            bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Step 3 of the module docstring: integer accumulators to the output."""
    y = (acc.float() * s_tok[:, None]) * scales.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def dgq_linear_ref(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                   qscales: torch.Tensor, scales: torch.Tensor, smooth: torch.Tensor,
                   group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] -> y [M, N]`` (module docstring), in ``x``'s dtype."""
    w8 = int8_weight_ref(qweight, qzeros, qscales, group_size)
    x8, s_tok = quantize_activations_ref(x, smooth)
    return rescale(int_matmul(x8, w8), s_tok, scales, bias, x.dtype)


def dense_weight_ref(qweight: torch.Tensor, qzeros: torch.Tensor, qscales: torch.Tensor,
                     scales: torch.Tensor, smooth: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 ``[K, N]`` weight ``s_c * w8 / t`` the layer applies to unquantized inputs
    (its output without activation quantization)."""
    w8 = int8_weight_ref(qweight, qzeros, qscales, group_size)
    return w8.float() * scales.float()[None, :] / smooth.float()[:, None]
