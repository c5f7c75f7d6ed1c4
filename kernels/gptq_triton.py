"""GPTQ linear in Triton: a fused dequant-GEMM for small batches, dequantize-then-matmul for
large ones. Same contract as :func:`optgptq_kernels.gptq.gptq_linear_ref`.

Fused path (``M <= FUSED_MAX_M``, decode): program ``(m, n, k)`` computes a ``BLOCK_M x BLOCK_N``
output tile over every ``SPLIT_K``-th ``BLOCK_K`` slice of the input dimension. With ``SPLIT_K >
1`` the slices' partial sums meet in a float32 buffer by atomic adds, which keeps the GPU busy
when ``M x N`` alone gives too few tiles. Three ways to form a slice's product:

- ``GROUP_ALIGNED`` (no act-order, ``BLOCK_K`` divides the group size): the slice lies in one
  group, so ``x . ((q - z) s) = s (x . (OFFSET + q) - (OFFSET + z) sum(x))``. The dot runs on
  the raw codes made exact floats by bit pattern (``0x6400 | q`` is ``1024 + q`` in float16,
  ``0x4300 | q`` is ``128 + q`` in bfloat16), and scale and zero are applied once per slice.
- ``PER_SHIFT`` on top of that for 2/4/8 bits: the slice's packed rows are loaded once and shift
  ``j`` of every word (inputs ``k0 + PER * i + j``) meets the matching strided columns of ``x``
  in its own ``tl.dot``, so codes are never reordered in registers.
- otherwise (act-order, ragged groups) each row's scale and zero are gathered through ``g_idx``
  and the dequantized tile is rounded to the activation dtype before the dot.

3-bit codes straddle words and are read from the pair of words that holds them. Large batches
are compute-bound: the weight is dequantized once per call into a dense copy and multiplied by
``torch.matmul``.
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
def _scale_codes(q, offs_k, k_mask, offs_n, n_mask, qz_ptr, sc_ptr, g_ptr, stride_qz, stride_sc,
                 BITS: tl.constexpr):
    """Codes ``q[offs_k, offs_n]`` to float32 weights, each row with its own group (g_idx)."""
    tile_mask = k_mask[:, None] & n_mask[None, :]
    g = tl.load(g_ptr + offs_k, mask=k_mask, other=0)
    s = tl.load(sc_ptr + g[:, None] * stride_sc + offs_n[None, :], mask=tile_mask,
                other=0.0).to(tl.float32)
    z = _unpack(qz_ptr, offs_n[None, :], g[:, None] * stride_qz, 1, tile_mask, BITS) + 1
    return (q - z).to(tl.float32) * s


@triton.jit
def _exact_float(q, dtype: tl.constexpr, OFFSET: tl.constexpr):
    """Codes as exact floats ``OFFSET + q``: by bit pattern where an offset makes that an OR
    (1024 + q is 0x6400 | q in float16, 128 + q is 0x4300 | q in bfloat16), else converted."""
    if OFFSET == 1024:
        return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    elif OFFSET == 128:
        return (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return q.to(dtype)


@triton.jit
def _slice_dot(x_ptr, qw_ptr, offs_m, m_mask, stride_xm, offs_n, n_mask, k0, K, stride_qw,
               BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, OFFSET: tl.constexpr, PER_SHIFT: tl.constexpr,
               IEEE: tl.constexpr):
    """``x[:, slice] @ (OFFSET + q[slice, :])`` and the row sums of ``x[:, slice]``.

    ``PER_SHIFT`` (2/4/8 bits): the slice's packed rows are loaded once; shift ``j`` of every
    word holds the codes of inputs ``k0 + PER * i + j``, which meet the matching strided columns
    of ``x`` in one ``tl.dot`` per shift, so codes never need reordering in registers.
    Otherwise each code is read from its own word(s)."""
    part = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    x_sum = tl.zeros([BLOCK_M], tl.float32)
    if PER_SHIFT:
        per: tl.constexpr = 32 // BITS
        rows = k0 // per + tl.arange(0, BLOCK_K // per)
        words = tl.load(qw_ptr + rows[:, None] * stride_qw + offs_n[None, :],
                        mask=(rows * per < K)[:, None] & n_mask[None, :], other=0)
        for j in tl.static_range(per):
            kk = k0 + tl.arange(0, BLOCK_K // per) * per + j
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                        mask=m_mask[:, None] & (kk < K)[None, :], other=0.0)
            w = _exact_float((words >> (j * BITS)) & ((1 << BITS) - 1), x.dtype, OFFSET)
            if IEEE:
                part += tl.dot(x, w, input_precision="ieee")
            else:
                part += tl.dot(x, w)
            x_sum += tl.sum(x.to(tl.float32), 1)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        q = _unpack(qw_ptr, offs_k[:, None], offs_n[None, :], stride_qw,
                    k_mask[:, None] & n_mask[None, :], BITS)
        w = _exact_float(q, x.dtype, OFFSET)
        if IEEE:
            part = tl.dot(x, w, input_precision="ieee")
        else:
            part = tl.dot(x, w)
        x_sum = tl.sum(x.to(tl.float32), 1)
    return part, x_sum


@triton.jit
def _write_out(acc, offs_m, offs_n, m_mask, n_mask, M, N, bias_ptr, out_ptr, stride_om, ws_ptr,
               lock_ptr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store a program's ``acc`` tile. With ``SPLIT_K > 1`` each program stores its partial in
    the workspace and counts itself in on the tile's lock; the last to arrive sums the
    partials, writes the output and resets the lock to zero for the next call, so split-K needs
    no zeroed buffer and no second kernel."""
    mask = m_mask[:, None] & n_mask[None, :]
    tile = offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_K > 1:
        tl.store(ws_ptr + tl.program_id(2) * M * N + tile, acc, mask=mask)
        tl.debug_barrier()
        lock = lock_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        if tl.atomic_add(lock, 1, sem="acq_rel") == SPLIT_K - 1:
            acc = tl.zeros(acc.shape, tl.float32)
            for part in range(0, SPLIT_K):
                acc += tl.load(ws_ptr + part * M * N + tile, mask=mask, other=0.0,
                               cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr, N, K,
                 group_size, stride_qw, stride_qz, stride_sc,
                 BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One input row (decode at batch 1), 2/4/8 bits, groups aligned to slices: no tensor cores;
    shift ``j`` of the packed rows meets inputs ``k0 + PER * i + j`` in float32 FMAs into a
    ``[BLOCK_K / PER, BLOCK_N]`` tile, scaled once per slice and reduced once at the end."""
    pid_n, pid_k = tl.program_id(1), tl.program_id(2)
    per: tl.constexpr = 32 // BITS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_K // per, BLOCK_N], tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        rows = k0 // per + tl.arange(0, BLOCK_K // per)
        words = tl.load(qw_ptr + rows[:, None] * stride_qw + offs_n[None, :],
                        mask=(rows * per < K)[:, None] & n_mask[None, :], other=0)
        part = tl.zeros([BLOCK_K // per, BLOCK_N], tl.float32)
        x_sum = tl.zeros([BLOCK_K // per], tl.float32)
        for j in tl.static_range(per):
            kk = k0 + tl.arange(0, BLOCK_K // per) * per + j
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            q = ((words >> (j * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
            part += x[:, None] * q
            x_sum += x
        g = k0 // group_size
        s = tl.load(sc_ptr + g * stride_sc + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = (_unpack(qz_ptr, offs_n, g * stride_qz, 1, n_mask, BITS) + 1).to(tl.float32)
        acc += s[None, :] * (part - x_sum[:, None] * z[None, :])
    total = tl.sum(acc, 0)[None, :]
    offs_m = tl.arange(0, 1)
    _write_out(total, offs_m, offs_n, offs_m < 1, n_mask, 1, N, bias_ptr, out_ptr, N, ws_ptr,
               lock_ptr, SPLIT_K, HAS_BIAS)


@triton.jit
def _fused_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, g_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
                  M, N, K, group_size,
                  stride_xm, stride_qw, stride_qz, stride_sc, stride_om,
                  BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_ALIGNED: tl.constexpr,
                  OFFSET: tl.constexpr, PER_SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr,
                  IEEE: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        if GROUP_ALIGNED:
            # The slice lies in one group: x.((q - z) s) = s (x.(OFFSET + q) - (OFFSET + z) sum x)
            part, x_sum = _slice_dot(x_ptr, qw_ptr, offs_m, m_mask, stride_xm, offs_n, n_mask,
                                     k0, K, stride_qw, BITS, BLOCK_M, BLOCK_N, BLOCK_K, OFFSET,
                                     PER_SHIFT, IEEE)
            g = k0 // group_size
            s = tl.load(sc_ptr + g * stride_sc + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            z = _unpack(qz_ptr, offs_n, g * stride_qz, 1, n_mask, BITS) + 1 + OFFSET
            acc += s[None, :] * (part - x_sum[:, None] * z.to(tl.float32)[None, :])
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            q = _unpack(qw_ptr, offs_k[:, None], offs_n[None, :], stride_qw,
                        k_mask[:, None] & n_mask[None, :], BITS)
            w = _scale_codes(q, offs_k, k_mask, offs_n, n_mask, qz_ptr, sc_ptr, g_ptr, stride_qz,
                             stride_sc, BITS).to(x.dtype)
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
    _write_out(acc, offs_m, offs_n, m_mask, n_mask, M, N, bias_ptr, out_ptr, stride_om, ws_ptr,
               lock_ptr, SPLIT_K, HAS_BIAS)


@triton.jit
def _dequant_kernel(qw_ptr, qz_ptr, sc_ptr, g_ptr, w_ptr, N, K,
                    stride_qw, stride_qz, stride_sc, stride_w,
                    BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if 32 % BITS == 0:  # load the packed rows once; shift j holds inputs k0 + PER * i + j
        per: tl.constexpr = 32 // BITS
        rows = k0 // per + tl.arange(0, BLOCK_K // per)
        words = tl.load(qw_ptr + rows[:, None] * stride_qw + offs_n[None, :],
                        mask=(rows * per < K)[:, None] & n_mask[None, :], other=0)
        for j in tl.static_range(per):
            kk = k0 + tl.arange(0, BLOCK_K // per) * per + j
            k_mask = kk < K
            w = _scale_codes((words >> (j * BITS)) & ((1 << BITS) - 1), kk, k_mask, offs_n,
                             n_mask, qz_ptr, sc_ptr, g_ptr, stride_qz, stride_sc, BITS)
            tl.store(w_ptr + kk[:, None] * stride_w + offs_n[None, :],
                     w.to(w_ptr.dtype.element_ty), mask=k_mask[:, None] & n_mask[None, :])
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        q = _unpack(qw_ptr, offs_k[:, None], offs_n[None, :], stride_qw,
                    k_mask[:, None] & n_mask[None, :], BITS)
        w = _scale_codes(q, offs_k, k_mask, offs_n, n_mask, qz_ptr, sc_ptr, g_ptr, stride_qz,
                         stride_sc, BITS)
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


def _pick_block_k(group_size: int, bits: int) -> tuple[int, bool, bool]:
    """The fused kernel's BLOCK_K, whether each slice stays inside one group, and whether it
    runs per shift (a dot per shift needs ``BLOCK_K / (32 / bits) >= 16`` inputs)."""
    if bits != 3 and group_size and group_size % (16 * 32 // bits) == 0:
        return 16 * 32 // bits, True, True
    for block_k in (128, 64, 32):
        if group_size and group_size % block_k == 0:
            return block_k, True, False
    return (64 if bits != 3 else 32), False, False


def _num_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def dequantize_triton(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      g_idx: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[K, N]`` weight in ``dtype``."""
    check_bits(bits)
    k, n = g_idx.shape[0], scales.shape[1]
    block_k = 128 if bits != 3 else 32
    w = torch.empty((k, n), dtype=dtype, device=scales.device)
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, 64))
    _dequant_kernel[grid](qweight, qzeros, scales, g_idx, w, n, k,
                          qweight.stride(0), qzeros.stride(0), scales.stride(0), w.stride(0),
                          BITS=bits, BLOCK_K=block_k, BLOCK_N=64)
    return w


_LOCKS: dict[torch.device, torch.Tensor] = {}


def _locks(device: torch.device, tiles: int) -> torch.Tensor:
    """Per-tile arrival counters for split-K, zero between calls (the last program resets its
    own); grown on demand, allocated outside any graph capture by the first call of a shape."""
    locks = _LOCKS.get(device)
    if locks is None or locks.numel() < tiles:
        locks = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
        _LOCKS[device] = locks
    return locks


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
    block_k, aligned, per_shift = _pick_block_k(group_size, bits)
    gemv = m == 1 and aligned and bits != 3
    block_m = 1 if gemv else (16 if m <= 16 else (32 if m <= 32 else 64))
    per_shift = per_shift and block_m == 16  # the strided x loads only pay off for short x
    # Tiling measured on an H200 (bench/kernels.py): GEMV and short dots want wide tiles split
    # along K until the GPU holds ~4 (GEMV) or ~2 (dot) programs per SM.
    on_gpu = x.device.type == "cuda"
    block_n = (256 if m <= 16 else 64) if on_gpu else 32
    target = _num_programs(x.device) * (2 if gemv else 1)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = 1
    while (split_k < 16 and tiles * split_k * 2 <= target
           and k // (block_k * split_k * 2) >= 2):
        split_k *= 2
    launch(x, qweight, qzeros, scales, g_idx, bits, bias, out, group_size, aligned, per_shift,
           gemv, block_m, block_n, block_k, split_k)
    return out


def launch(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
           g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None, out: torch.Tensor,
           group_size: int, aligned: bool, per_shift: bool, gemv: bool, block_m: int,
           block_n: int, block_k: int, split_k: int, num_warps: int = 4,
           num_stages: int = 3) -> None:
    """One launch of the GEMV or fused kernel with an explicit tiling (also used to tune it)."""
    m, k = x.shape
    n = out.shape[1]
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    ws = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    locks = _locks(x.device, grid[0] * grid[1]) if split_k > 1 else out
    bias_arg = bias if bias is not None else x
    if gemv:
        _gemv_kernel[grid](x, qweight, qzeros, scales, bias_arg, out, ws, locks, n, k,
                           group_size, qweight.stride(0), qzeros.stride(0), scales.stride(0),
                           BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
                           HAS_BIAS=bias is not None, num_warps=num_warps,
                           num_stages=num_stages)
        return
    offset = 0
    if aligned and x.dtype == torch.float16:
        offset = 1024
    elif aligned and x.dtype == torch.bfloat16 and bits < 8:
        offset = 128
    _fused_kernel[grid](x, qweight, qzeros, scales, g_idx, bias_arg, out, ws, locks,
                        m, n, k, max(group_size, 1), x.stride(0), qweight.stride(0),
                        qzeros.stride(0), scales.stride(0), out.stride(0),
                        BITS=bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                        SPLIT_K=split_k, GROUP_ALIGNED=aligned, OFFSET=offset, PER_SHIFT=per_shift,
                        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                        num_warps=num_warps, num_stages=num_stages)
