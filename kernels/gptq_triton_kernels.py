"""The GPTQ Triton kernels for several rows and the helpers all GPTQ kernels share (the GEMVs
are in :mod:`optgptq_kernels.gptq_triton_gemv`); the algorithm and the host code that picks a
kernel and its tiling are in :mod:`optgptq_kernels.gptq_triton`."""

from __future__ import annotations

import triton
import triton.language as tl


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
def _packed_rows(qw_ptr, k0, K, offs_n, n_mask, stride_qw, BITS: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """The ``BLOCK_K / (32 / BITS)`` packed int32 rows holding inputs ``k0 .. k0 + BLOCK_K``
    (2/4/8 bits: shift ``j`` of row ``i`` is input ``k0 + (32 / BITS) * i + j``)."""
    per: tl.constexpr = 32 // BITS
    rows = k0 // per + tl.arange(0, BLOCK_K // per)
    return tl.load(qw_ptr + rows[:, None] * stride_qw + offs_n[None, :],
                   mask=(rows * per < K)[:, None] & n_mask[None, :], other=0)


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
def _code_float(q):
    """Codes ``0 <= q < 2**23`` as exact float32 without an int-to-float conversion (a
    quarter-rate instruction on NVIDIA GPUs): ``2**23 + q`` by bit pattern, minus ``2**23``."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _slice_dot(x_ptr, qw_ptr, offs_m, m_mask, stride_xm, offs_n, n_mask, k0, K, stride_qw,
               BITS: tl.constexpr, BLOCK_K: tl.constexpr, OFFSET: tl.constexpr,
               IEEE: tl.constexpr):
    """``x[:, slice] @ (OFFSET + q[slice, :])`` and the row sums of ``x[:, slice]``, each code
    read from its own word(s)."""
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
    return part, tl.sum(x.to(tl.float32), 1)


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
            for part in tl.static_range(SPLIT_K):  # unrolled: the loads go out together
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
def fused_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, g_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
                  M, N, K, group_size,
                  stride_xm, stride_qw, stride_qz, stride_sc, stride_om,
                  BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_ALIGNED: tl.constexpr,
                  OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        if GROUP_ALIGNED:
            # The slice lies in one group: x.((q - z) s) = s (x.(OFFSET + q) - (OFFSET + z) sum x)
            part, x_sum = _slice_dot(x_ptr, qw_ptr, offs_m, m_mask, stride_xm, offs_n, n_mask,
                                     k0, K, stride_qw, BITS, BLOCK_K, OFFSET, IEEE)
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
def _slice_codes(qw_ptr, qz_ptr, sc_ptr, k0, K, offs_n, n_mask, group_size, stride_qw, stride_qz,
                 stride_sc, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """A slice's packed rows, its group's scales and its zero points ``z + 1``."""
    words = _packed_rows(qw_ptr, k0, K, offs_n, n_mask, stride_qw, BITS, BLOCK_K)
    g = k0 // group_size
    s = tl.load(sc_ptr + g * stride_sc + offs_n, mask=n_mask, other=0.0)
    z = _unpack(qz_ptr, offs_n, g * stride_qz, 1, n_mask, BITS) + 1
    return words, s, z


@triton.jit
def unpacked_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
                    M, N, K, group_size, stride_xm, stride_qw, stride_qz, stride_sc, stride_om,
                    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, OFFSET: tl.constexpr,
                    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    """Aligned groups, 2/4/8 bits, a few dozen rows. A slice's packed rows are loaded once and
    unpacked in registers: each word is shifted by every code offset at once (a ``[rows, PER,
    BLOCK_N]`` broadcast) and reshaped to the ``[BLOCK_K, BLOCK_N]`` tile in input order. The
    tile is dequantized in the activation dtype (codes and zeros as exact floats ``OFFSET + q``,
    whose difference is exact) and meets ``x`` in one ``tl.dot``. Triton pipelines only the
    loads that feed a ``tl.dot``, so the next slice's words, scales and zeros are loaded into
    registers before this slice is used (the last prefetch wraps to slice 0: a harmless read)."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    per: tl.constexpr = 32 // BITS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    shifts = tl.arange(0, per) * BITS
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    step = BLOCK_K * SPLIT_K
    words, s, z = _slice_codes(qw_ptr, qz_ptr, sc_ptr, pid_k * BLOCK_K, K, offs_n, n_mask,
                               group_size, stride_qw, stride_qz, stride_sc, BITS, BLOCK_K)
    for k0 in range(pid_k * BLOCK_K, K, step):
        ahead = (k0 + step) % (tl.cdiv(K, BLOCK_K) * BLOCK_K)
        next_words, next_s, next_z = _slice_codes(qw_ptr, qz_ptr, sc_ptr, ahead, K, offs_n,
                                                  n_mask, group_size, stride_qw, stride_qz,
                                                  stride_sc, BITS, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        q = _exact_float(tl.reshape(codes, [BLOCK_K, BLOCK_N]), dtype, OFFSET)
        w = ((q - _exact_float(z, dtype, OFFSET)[None, :]) * s.to(dtype)[None, :]).to(dtype)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
        words, s, z = next_words, next_s, next_z
    _write_out(acc, offs_m, offs_n, m_mask, n_mask, M, N, bias_ptr, out_ptr, stride_om, ws_ptr,
               lock_ptr, SPLIT_K, HAS_BIAS)


@triton.jit
def swapped_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
                   M, N, K, group_size, stride_xm, stride_qw, stride_qz, stride_sc, stride_om,
                   BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, OFFSET: tl.constexpr,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    """Aligned groups, 2/4/8 bits, per shift, computed transposed: ``out^T = W^T x^T``. The
    codes fill the MMA's wide A operand (``BLOCK_N`` output features) straight from registers
    and the few activation rows are its narrow B operand, so the dequantized tile never makes a
    trip through shared memory. With an exact-float ``OFFSET`` the codes at shifts ``s`` and
    ``s + PER / 2`` of a word are made floats two at a time: one mask of both 16-bit halves,
    one OR with the offset's bit pattern in each half, and the halves are the two floats."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    per: tl.constexpr = 32 // BITS
    half: tl.constexpr = per // 2
    pair_magic: tl.constexpr = (0x6400 if OFFSET == 1024 else 0x4300) * 0x00010001
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        rows = k0 // per + tl.arange(0, BLOCK_K // per)
        words = tl.load(qw_ptr + rows[None, :] * stride_qw + offs_n[:, None],
                        mask=(rows * per < K)[None, :] & n_mask[:, None], other=0)
        part = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        x_sum = tl.zeros([BLOCK_M], tl.float32)
        if OFFSET > 0:
            c = tl.arange(0, 2 * (BLOCK_K // per))
            for s in tl.static_range(half):
                pairs = ((words >> (s * BITS)) & (((1 << BITS) - 1) * 0x00010001)) | pair_magic
                lo = pairs.to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True)
                hi = (pairs >> 16).to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True)
                w = tl.reshape(tl.join(lo, hi), [BLOCK_N, 2 * (BLOCK_K // per)])
                kk = k0 + (c // 2) * per + s + (c % 2) * half
                xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + kk[:, None],
                             mask=m_mask[None, :] & (kk < K)[:, None], other=0.0)
                part += tl.dot(w, xt)
                x_sum += tl.sum(xt.to(tl.float32), 0)
        else:
            for j in tl.static_range(per):
                kk = k0 + tl.arange(0, BLOCK_K // per) * per + j
                xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + kk[:, None],
                             mask=m_mask[None, :] & (kk < K)[:, None], other=0.0)
                w = (words >> (j * BITS)) & ((1 << BITS) - 1)
                if IEEE:
                    part += tl.dot(w.to(xt.dtype), xt, input_precision="ieee")
                else:
                    part += tl.dot(w.to(xt.dtype), xt)
                x_sum += tl.sum(xt.to(tl.float32), 0)
        g = k0 // group_size
        s = tl.load(sc_ptr + g * stride_sc + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = _code_float(_unpack(qz_ptr, offs_n, g * stride_qz, 1, n_mask, BITS) + 1 + OFFSET)
        acc += s[:, None] * (part - z[:, None] * x_sum[None, :])
    _write_out(tl.trans(acc), offs_m, offs_n, m_mask, n_mask, M, N, bias_ptr, out_ptr,
               stride_om, ws_ptr, lock_ptr, SPLIT_K, HAS_BIAS)


@triton.jit
def dequant_kernel(qw_ptr, qz_ptr, sc_ptr, g_ptr, w_ptr, N, K,
                    stride_qw, stride_qz, stride_sc, stride_w,
                    BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if 32 % BITS == 0:  # load the packed rows once; shift j holds inputs k0 + PER * i + j
        per: tl.constexpr = 32 // BITS
        words = _packed_rows(qw_ptr, k0, K, offs_n, n_mask, stride_qw, BITS, BLOCK_K)
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
