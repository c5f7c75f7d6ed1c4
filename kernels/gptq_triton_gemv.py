"""The GPTQ GEMV kernels: one input row (decode at batch 1), groups aligned to the slices, on
CUDA cores. The host code that picks one is in :mod:`optgptq_kernels.gptq_triton`.

- ``gemv_half2_kernel`` (4 bits, float16 input, NVIDIA): a word's eight codes are dotted with
  their inputs in float16 pairs by inline PTX. Codes ``s`` and ``s + 4`` (bits ``4s`` and
  ``16 + 4s``) form one pair; one ``lop3`` masks them in place and ORs in the float16 exponent
  of 1024, which reads as ``1024 + q`` for the codes at bits 0-3 and 16-19 and as
  ``1024 + 16 q`` for those at bits 4-7 and 20-23, so one shift by 8 serves all four pairs of a
  word. One ``sub.f16x2`` of the column's ``1024 + z`` (or ``1024 + 16 z``) leaves the exact
  ``q - z`` (or ``16 (q - z)``), and one ``fma.f16x2`` multiplies it with the inputs
  ``x[8i + s], x[8i + s + 4]`` (divided by 16 for the odd pairs, exactly) and accumulates; the
  pair's two float16 sums of four products become one float32 per word, and a slice's words
  are summed per column before its group's scale. The input pairs are built once per packed
  row from two 32-bit loads by ``prmt``. About 2 instructions a code. Products are rounded to
  float16 (2**-11) and four are summed there, so the relative error vs float64 is about 4e-4
  (float32 arithmetic: 2e-4), and ``|x| (q - z)`` summed over four codes must stay inside
  float16's range. The next slice's words are loaded before this one's are used (Triton does
  not pipeline loads that feed no ``tl.dot``). Off NVIDIA (``PTX=False``: Triton's interpreter)
  the same arithmetic runs as Triton float16 ops.
- ``gemv_kernel`` (2/4/8 bits, any float input): float32 arithmetic; see its docstring.
"""

from __future__ import annotations

import triton
import triton.language as tl

from optgptq_kernels.gptq_triton_kernels import _code_float, _packed_rows, _unpack, _write_out


@triton.jit
def _half(bits16):
    """The float16 whose bit pattern is the low 16 bits of ``bits16``."""
    return (bits16 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _bits(lo, hi):
    """The word holding float16 ``lo`` in its low and ``hi`` in its high half."""
    lo = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return lo | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _x_pairs(xw_ptr, rows, mask, PTX: tl.constexpr):
    """For packed rows ``rows``, the input pairs ``(x[8i + s], x[8i + s + 4])`` of ``s = 0..3``
    as words of two float16 (``xw_ptr``: ``x`` read as 32-bit words), the odd ``s`` divided by
    16 (exact: a power of two)."""
    w0 = tl.load(xw_ptr + rows * 4, mask=mask, other=0)
    w1 = tl.load(xw_ptr + rows * 4 + 1, mask=mask, other=0)
    w2 = tl.load(xw_ptr + rows * 4 + 2, mask=mask, other=0)
    w3 = tl.load(xw_ptr + rows * 4 + 3, mask=mask, other=0)
    if PTX:
        return tl.inline_asm_elementwise("""
        {
        .reg .b32 t, c;
        mov.b32 c, 0x2C002C00;
        prmt.b32 $0, $4, $6, 0x5410;
        prmt.b32 t, $4, $6, 0x7632;
        mul.rn.f16x2 $1, t, c;
        prmt.b32 $2, $5, $7, 0x5410;
        prmt.b32 t, $5, $7, 0x7632;
        mul.rn.f16x2 $3, t, c;
        }
        """, "=r,=r,=r,=r,r,r,r,r", [w0, w1, w2, w3],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        return (_bits(_half(w0), _half(w2)),
                _bits(_half(w0 >> 16) * 0.0625, _half(w2 >> 16) * 0.0625),
                _bits(_half(w1), _half(w3)),
                _bits(_half(w1 >> 16) * 0.0625, _half(w3 >> 16) * 0.0625))


@triton.jit
def _pair_dot(codes, z, x):
    """``(codes - z) * x`` in float16 for both halves of the words (low, high)."""
    return ((_half(codes) - _half(z)) * _half(x),
            (_half(codes >> 16) - _half(z >> 16)) * _half(x >> 16))


@triton.jit
def _dot8(words, x0, x1, x2, x3, z_lo, z_hi, PTX: tl.constexpr):
    """``sum_j x_j (q_j - z)`` over the eight 4-bit codes ``q_j`` of each word; ``x_s`` holds
    the float16 inputs of codes ``s`` (low half) and ``s + 4`` (high half), the odd ``s``
    divided by 16; ``z_lo`` the pair ``1024 + z`` twice, ``z_hi`` the pair ``1024 + 16 z``.
    Float16 products and sums, a float32 result."""
    if PTX:
        return tl.inline_asm_elementwise("""
        {
        .reg .b32 t, u, w, a;
        .reg .b16 l, h;
        .reg .f32 fl, fh;
        lop3.b32 t, $1, 0x000F000F, 0x64006400, 0xEA;
        sub.f16x2 w, t, $6;
        mul.rn.f16x2 a, w, $2;
        lop3.b32 t, $1, 0x00F000F0, 0x64006400, 0xEA;
        sub.f16x2 w, t, $7;
        fma.rn.f16x2 a, w, $3, a;
        shr.u32 u, $1, 8;
        lop3.b32 t, u, 0x000F000F, 0x64006400, 0xEA;
        sub.f16x2 w, t, $6;
        fma.rn.f16x2 a, w, $4, a;
        lop3.b32 t, u, 0x00F000F0, 0x64006400, 0xEA;
        sub.f16x2 w, t, $7;
        fma.rn.f16x2 a, w, $5, a;
        mov.b32 {l, h}, a;
        cvt.f32.f16 fl, l;
        cvt.f32.f16 fh, h;
        add.f32 $0, fl, fh;
        }
        """, "=f,r,r,r,r,r,r,r", [words, x0, x1, x2, x3, z_lo, z_hi], dtype=tl.float32,
            is_pure=True, pack=1)
    else:
        upper = words >> 8
        lo, hi = _pair_dot((words & 0x000F000F) | 0x64006400, z_lo, x0)
        a, b = _pair_dot((words & 0x00F000F0) | 0x64006400, z_hi, x1)
        lo, hi = lo + a, hi + b
        a, b = _pair_dot((upper & 0x000F000F) | 0x64006400, z_lo, x2)
        lo, hi = lo + a, hi + b
        a, b = _pair_dot((upper & 0x00F000F0) | 0x64006400, z_hi, x3)
        lo, hi = lo + a, hi + b
        return lo.to(tl.float32) + hi.to(tl.float32)


@triton.jit
def gemv_half2_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr, N, K,
                      stride_qw, stride_qz, stride_sc, GROUP: tl.constexpr,
                      BLOCK_N: tl.constexpr, ROWS: tl.constexpr, SPLIT_K: tl.constexpr,
                      HAS_BIAS: tl.constexpr, PTX: tl.constexpr):
    """4-bit codes, float16 input: ``ROWS`` packed rows (``8 ROWS`` inputs, one group of
    ``GROUP``) a slice."""
    pid_n, pid_k = tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    xw_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    rows = pid_k * ROWS + tl.arange(0, ROWS)
    words = tl.load(qw_ptr + rows[:, None] * stride_qw + offs_n[None, :],
                    mask=(rows * 8 < K)[:, None] & n_mask[None, :], other=0)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(pid_k * ROWS * 8, K, ROWS * 8 * SPLIT_K):
        rows = k0 // 8 + tl.arange(0, ROWS)
        ahead = rows + ROWS * SPLIT_K
        next_words = tl.load(qw_ptr + ahead[:, None] * stride_qw + offs_n[None, :],
                             mask=(ahead * 8 < K)[:, None] & n_mask[None, :], other=0)
        x0, x1, x2, x3 = _x_pairs(xw_ptr, rows, rows * 8 < K, PTX)
        g = k0 // GROUP
        s = tl.load(sc_ptr + g * stride_sc + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = _unpack(qz_ptr, offs_n, g * stride_qz, 1, n_mask, 4) + 1
        d = _dot8(words, x0[:, None], x1[:, None], x2[:, None], x3[:, None],
                  ((z | 0x6400) * 0x10001)[None, :], (((z << 4) | 0x6400) * 0x10001)[None, :],
                  PTX)
        acc += s * tl.sum(d, 0)
        words = next_words
    offs_m = tl.arange(0, 1)
    _write_out(acc[None, :], offs_m, offs_n, offs_m < 1, n_mask, 1, N, bias_ptr, out_ptr, N,
               ws_ptr, lock_ptr, SPLIT_K, HAS_BIAS)


@triton.jit
def gemv_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr, N, K,
                group_size, magic, stride_qw, stride_qz, stride_sc,
                BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One input row (decode at batch 1), 2/4/8 bits, groups aligned to slices, on CUDA cores.
    A slice's few packed rows are loaded as one ``[BLOCK_K / PER, BLOCK_N]`` tile; shift ``j``
    of every word meets inputs ``k0 + PER * i + j``. A code costs one LOP3, one FADD and one
    FFMA: it is masked in place and OR'ed with the exponent bits of 2**23 (``magic``, passed at
    run time so that it sits in a register and both fold into one LOP3), which reads as
    ``2**23 + q * 2**p`` for a code at bit ``p`` of its half-word; minus 2**23 it is exact, and
    its inputs are pre-scaled by ``2**-p``. The upper half-words come from one shift per word."""
    pid_n, pid_k = tl.program_id(1), tl.program_id(2)
    per: tl.constexpr = 32 // BITS
    half: tl.constexpr = per // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_K // per, BLOCK_N], tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        words = _packed_rows(qw_ptr, k0, K, offs_n, n_mask, stride_qw, BITS, BLOCK_K)
        upper = words >> 16
        part = tl.zeros([BLOCK_K // per, BLOCK_N], tl.float32)
        x_sum = tl.zeros([BLOCK_K // per], tl.float32)
        for j in tl.static_range(per):
            kk = k0 + tl.arange(0, BLOCK_K // per) * per + j
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            x_sum += x
            src = words if j < half else upper
            code = ((src & (((1 << BITS) - 1) << (BITS * (j % half)))) | magic
                    ).to(tl.float32, bitcast=True)
            part += (x * (1.0 / (1 << (BITS * (j % half)))))[:, None] * (code - 8388608.0)
        g = k0 // group_size
        s = tl.load(sc_ptr + g * stride_sc + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = _code_float(_unpack(qz_ptr, offs_n, g * stride_qz, 1, n_mask, BITS) + 1)
        acc += s[None, :] * (part - x_sum[:, None] * z[None, :])
    total = tl.sum(acc, 0)[None, :]
    offs_m = tl.arange(0, 1)
    _write_out(total, offs_m, offs_n, offs_m < 1, n_mask, 1, N, bias_ptr, out_ptr, N, ws_ptr,
               lock_ptr, SPLIT_K, HAS_BIAS)
