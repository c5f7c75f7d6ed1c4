"""GPTQ linear in Triton: a fused dequant-GEMM for small batches, dequantize-then-matmul for
large ones. Same contract as :func:`optgptq_kernels.gptq.gptq_linear_ref`.

Fused path (``M <= FUSED_MAX_M``, decode): program ``(m, n, k)`` computes a ``BLOCK_M x
BLOCK_N`` output tile over every ``SPLIT_K``-th ``BLOCK_K`` slice of the input dimension. Each
slice's weight tile is unpacked in registers: for 2/4/8 bits the ``BLOCK_K / (32 / bits)``
packed rows are loaded once and shifted out; for 3 bits each code is read from the pair of words
it may straddle. When groups are contiguous and a whole slice lies in one group
(``GROUP_ALIGNED``: no act-order and ``BLOCK_K`` divides the group size) the slice needs one row of
scales and zeros; otherwise they are gathered per input row through ``g_idx`` (act-order,
ragged groups). The float32 product ``(q - z) * s`` is rounded to the activation dtype and fed
to ``tl.dot`` with float32 accumulation. With ``SPLIT_K > 1`` the slices' partial sums meet in a
float32 buffer by atomic adds, which keeps a GPU busy when ``M x N`` alone gives too few tiles.

Large batches are compute-bound: the weight is dequantized once per call by the same unpacking
code into a dense tile-by-tile copy and multiplied by ``torch.matmul``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from optgptq_kernels.gptq import check_bits

FUSED_MAX_M = 64


@triton.jit
def _unpack(ptr, idx, other_off, stride_word, mask, BITS: tl.constexpr):
    """Codes number ``idx`` of the bit streams that run along one dimension of a packed int32
    matrix (``stride_word`` apart), at offset ``other_off`` along the other dimension; ``idx``
    and ``other_off`` broadcast against each other."""
    bit = idx * BITS
    word = bit // 32
    shift = bit % 32
    lo = tl.load(ptr + word * stride_word + other_off, mask=mask, other=0)
    if 32 % BITS == 0:
        return (lo >> shift) & ((1 << BITS) - 1)
    hi = tl.load(ptr + (word + 1) * stride_word + other_off, mask=mask & (shift + BITS > 32),
                 other=0)
    pair = (lo.to(tl.int64) & 0xFFFFFFFF) | ((hi.to(tl.int64) & 0xFFFFFFFF) << 32)
    return ((pair >> shift.to(tl.int64)) & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _weight_tile(qw_ptr, qz_ptr, sc_ptr, g_ptr, offs_k, offs_n, k_mask, n_mask, k0, K, group_size,
                 stride_qw, stride_qz, stride_sc,
                 BITS: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_ALIGNED: tl.constexpr,
                 RESHAPE: tl.constexpr):
    """The float32 weight tile ``W[offs_k, offs_n]`` (``offs_k = k0 + arange(BLOCK_K)``)."""
    tile_mask = k_mask[:, None] & n_mask[None, :]
    if 32 % BITS == 0 and RESHAPE:
        per: tl.constexpr = 32 // BITS
        rows = k0 // per + tl.arange(0, BLOCK_K // per)
        words = tl.load(qw_ptr + rows[:, None] * stride_qw + offs_n[None, :],
                        mask=(rows * per < K)[:, None] & n_mask[None, :], other=0)
        shifts = tl.arange(0, per) * BITS
        q = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        q = tl.reshape(q, (BLOCK_K, q.shape[2]))
    else:
        q = _unpack(qw_ptr, offs_k[:, None], offs_n[None, :], stride_qw, tile_mask, BITS)
    if GROUP_ALIGNED:
        g = k0 // group_size
        s = tl.load(sc_ptr + g * stride_sc + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = _unpack(qz_ptr, offs_n, g * stride_qz, 1, n_mask, BITS) + 1
        return (q - z[None, :]).to(tl.float32) * s[None, :]
    g = tl.load(g_ptr + offs_k, mask=k_mask, other=0)
    s = tl.load(sc_ptr + g[:, None] * stride_sc + offs_n[None, :], mask=tile_mask,
                other=0.0).to(tl.float32)
    z = _unpack(qz_ptr, offs_n[None, :], g[:, None] * stride_qz, 1, tile_mask, BITS) + 1
    return (q - z).to(tl.float32) * s


@triton.jit
def _fused_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, g_ptr, bias_ptr, out_ptr, M, N, K, group_size,
                  stride_xm, stride_qw, stride_qz, stride_sc, stride_om,
                  BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_ALIGNED: tl.constexpr,
                  HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, GEMV: tl.constexpr,
                  RESHAPE: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    if GEMV:  # one row: FMAs into a [BLOCK_K, BLOCK_N] tile, reduced once at the end
        acc2 = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = _weight_tile(qw_ptr, qz_ptr, sc_ptr, g_ptr, offs_k, offs_n, k_mask, n_mask, k0, K,
                         group_size, stride_qw, stride_qz, stride_sc,
                         BITS, BLOCK_K, GROUP_ALIGNED, RESHAPE)
        w = tl.where(k_mask[:, None], w, 0.0)
        if GEMV:
            x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0)
            acc2 += x.to(tl.float32)[:, None] * w.to(x.dtype).to(tl.float32)
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
    if GEMV:
        acc = tl.sum(acc2, 0)[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(qw_ptr, qz_ptr, sc_ptr, g_ptr, w_ptr, N, K, group_size,
                    stride_qw, stride_qz, stride_sc, stride_w,
                    BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    GROUP_ALIGNED: tl.constexpr):
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask, n_mask = offs_k < K, offs_n < N
    w = _weight_tile(qw_ptr, qz_ptr, sc_ptr, g_ptr, offs_k, offs_n, k_mask, n_mask, k0, K,
                     group_size, stride_qw, stride_qz, stride_sc, BITS, BLOCK_K, GROUP_ALIGNED,
                     True)
    tl.store(w_ptr + offs_k[:, None] * stride_w + offs_n[None, :],
             w.to(w_ptr.dtype.element_ty), mask=k_mask[:, None] & n_mask[None, :])


def _group_layout(g_idx: torch.Tensor, k: int, num_groups: int) -> int:
    """The group size when ``g_idx`` is ``arange(K) // group_size``, else 0 (act-order).

    Read once per weight and cached on the tensor, so the check costs nothing per call."""
    cached = getattr(g_idx, "_optgptq_group_size", None)
    if cached is None:
        size = triton.cdiv(k, num_groups)
        trivial = torch.equal(g_idx.long().cpu(), torch.arange(k) // size)
        cached = size if trivial else 0
        g_idx._optgptq_group_size = cached
    return cached


def _pick_block_k(group_size: int, bits: int) -> tuple[int, bool]:
    """A BLOCK_K for the fused kernel and whether slices then stay inside one group."""
    for block_k in (128, 64, 32):
        if group_size and group_size % block_k == 0:
            return block_k, True
    return (64 if bits != 3 else 32), False


def _num_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def dequantize_triton(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      g_idx: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[K, N]`` weight in ``dtype``."""
    check_bits(bits)
    k, n = g_idx.shape[0], scales.shape[1]
    group_size = _group_layout(g_idx, k, scales.shape[0])
    block_k, aligned = _pick_block_k(group_size, bits)
    w = torch.empty((k, n), dtype=dtype, device=scales.device)
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, 64))
    _dequant_kernel[grid](qweight, qzeros, scales, g_idx, w, n, k, max(group_size, 1),
                          qweight.stride(0), qzeros.stride(0), scales.stride(0), w.stride(0),
                          BITS=bits, BLOCK_K=block_k, BLOCK_N=64, GROUP_ALIGNED=aligned)
    return w


def gptq_linear_triton(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                       scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                       bias: torch.Tensor | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W [K, N] (+ bias)`` into ``out`` (allocated when None) of ``x``'s dtype."""
    check_bits(bits)
    m, k = x.shape
    n = scales.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
    if m > FUSED_MAX_M:
        w = dequantize_triton(qweight, qzeros, scales, g_idx, bits, x.dtype)
        if bias is None:
            return torch.matmul(x, w, out=out)
        return torch.addmm(bias.to(x.dtype), x, w, out=out)
    x = x.contiguous()
    group_size = _group_layout(g_idx, k, scales.shape[0])
    block_k, aligned = _pick_block_k(group_size, bits)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64 if n >= 2048 or x.device.type != "cuda" else 32
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = 1
    while tiles * split_k * 2 <= _num_programs(x.device) and k // (block_k * split_k * 2) >= 4:
        split_k *= 2
    acc = torch.zeros((m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    _fused_kernel[grid](x, qweight, qzeros, scales, g_idx, bias if bias is not None else x, acc,
                        m, n, k, max(group_size, 1), x.stride(0), qweight.stride(0),
                        qzeros.stride(0), scales.stride(0), acc.stride(0),
                        BITS=bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                        SPLIT_K=split_k, GROUP_ALIGNED=aligned, HAS_BIAS=bias is not None,
                        IEEE=x.dtype == torch.float32, GEMV=False, RESHAPE=True,
                        num_warps=4, num_stages=3)
    if split_k > 1:
        out.copy_(acc)
    return out
