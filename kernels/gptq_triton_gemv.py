"""The GPTQ GEMV kernels: one input row (decode at batch 1), groups aligned to the slices, on
CUDA cores. The host code that picks one is in :mod:`optgptq_kernels.gptq_triton`.

- ``gemv_half2_kernel`` (4 bits, float16 input, NVIDIA): a word's eight codes are dotted with
  their inputs in float16 pairs by inline PTX. One ``lop3`` turns the codes at bits ``4s`` and
  ``16 + 4s`` into the float16 pair ``1024 + q`` (``0x6400 | q``), one ``sub.f16x2`` of the
  column's ``1024 + z`` leaves the exact ``q - z``, one ``fma.f16x2`` multiplies it with the
  paired inputs ``x[8i + s], x[8i + s + 4]`` and accumulates; the pair's two float16 sums of
  four products become one float32 per word, scaled per group in float32. About 2.4
  instructions a code against the float32 kernel's 5.5: on an H200 1.13-1.26x faster on
  Llama-3-8B's shapes. Products are rounded to float16 (2**-11) and four are summed there, so
  the relative error vs float64 is about 4e-4 against 2e-4. The next slice's words are loaded
  before this one's are used (Triton does not pipeline loads that feed no ``tl.dot``). Off
  NVIDIA (``PTX=False``: Triton's interpreter) the same arithmetic runs as Triton float16 ops.
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
def _codes(words, s: tl.constexpr):
    """The codes at bits ``4s`` and ``16 + 4s`` as the float16 pair ``1024 + q`` (bit patterns)."""
    return ((words >> (4 * s)) & 0x000F000F) | 0x64006400


@triton.jit
def _dot8(words, x0, x1, x2, x3, z2, PTX: tl.constexpr):
    """``sum_j x_j (q_j - z)`` over the eight 4-bit codes ``q_j`` of each word; ``x_s`` holds
    the float16 inputs of codes ``s`` (low half) and ``s + 4`` (high half), ``z2`` the pair
    ``1024 + z`` twice. Float16 products and sums, a float32 result."""
    if PTX:
        return tl.inline_asm_elementwise("""
        {
        .reg .b32 t, w, a;
        .reg .b16 l, h;
        .reg .f32 fl, fh;
        lop3.b32 t, $1, 0x000F000F, 0x64006400, 0xEA;
        sub.f16x2 w, t, $6;
        mul.rn.f16x2 a, w, $2;
        shr.u32 t, $1, 4;
        lop3.b32 t, t, 0x000F000F, 0x64006400, 0xEA;
        sub.f16x2 w, t, $6;
        fma.rn.f16x2 a, w, $3, a;
        shr.u32 t, $1, 8;
        lop3.b32 t, t, 0x000F000F, 0x64006400, 0xEA;
        sub.f16x2 w, t, $6;
        fma.rn.f16x2 a, w, $4, a;
        shr.u32 t, $1, 12;
        lop3.b32 t, t, 0x000F000F, 0x64006400, 0xEA;
        sub.f16x2 w, t, $6;
        fma.rn.f16x2 a, w, $5, a;
        mov.b32 {l, h}, a;
        cvt.f32.f16 fl, l;
        cvt.f32.f16 fh, h;
        add.f32 $0, fl, fh;
        }
        """, "=f,r,r,r,r,r,r", [words, x0, x1, x2, x3, z2], dtype=tl.float32, is_pure=True,
            pack=1)
    else:
        z = _half(z2)
        lo = (_half(_codes(words, 0)) - z) * _half(x0)
        hi = (_half(_codes(words, 0) >> 16) - z) * _half(x0 >> 16)
        lo += (_half(_codes(words, 1)) - z) * _half(x1)
        hi += (_half(_codes(words, 1) >> 16) - z) * _half(x1 >> 16)
        lo += (_half(_codes(words, 2)) - z) * _half(x2)
        hi += (_half(_codes(words, 2) >> 16) - z) * _half(x2 >> 16)
        lo += (_half(_codes(words, 3)) - z) * _half(x3)
        hi += (_half(_codes(words, 3) >> 16) - z) * _half(x3 >> 16)
        return lo.to(tl.float32) + hi.to(tl.float32)


@triton.jit
def _x_pair(x_ptr, k, mask):
    """Inputs ``k`` (low half) and ``k + 4`` (high half) as one word of two float16."""
    lo = tl.load(x_ptr + k, mask=mask, other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
    hi = tl.load(x_ptr + k + 4, mask=mask, other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
    return (lo & 0xFFFF) | (hi << 16)


@triton.jit
def gemv_half2_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr, N, K,
                      group_size, stride_qw, stride_qz, stride_sc,
                      BLOCK_N: tl.constexpr, ROWS: tl.constexpr, SPLIT_K: tl.constexpr,
                      HAS_BIAS: tl.constexpr, PTX: tl.constexpr):
    """4-bit codes, float16 input: ``ROWS`` packed rows (``8 ROWS`` inputs, one group) a slice."""
    pid_n, pid_k = tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = pid_k * ROWS + tl.arange(0, ROWS)
    words = tl.load(qw_ptr + rows[:, None] * stride_qw + offs_n[None, :],
                    mask=(rows * 8 < K)[:, None] & n_mask[None, :], other=0)
    acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
    for k0 in range(pid_k * ROWS * 8, K, ROWS * 8 * SPLIT_K):
        rows = k0 // 8 + tl.arange(0, ROWS)
        r_mask = rows * 8 < K
        ahead = rows + ROWS * SPLIT_K
        next_words = tl.load(qw_ptr + ahead[:, None] * stride_qw + offs_n[None, :],
                             mask=(ahead * 8 < K)[:, None] & n_mask[None, :], other=0)
        x0 = _x_pair(x_ptr, rows * 8, r_mask)
        x1 = _x_pair(x_ptr, rows * 8 + 1, r_mask)
        x2 = _x_pair(x_ptr, rows * 8 + 2, r_mask)
        x3 = _x_pair(x_ptr, rows * 8 + 3, r_mask)
        g = k0 // group_size
        s = tl.load(sc_ptr + g * stride_sc + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = _unpack(qz_ptr, offs_n, g * stride_qz, 1, n_mask, 4) + 1
        d = _dot8(words, x0[:, None], x1[:, None], x2[:, None], x3[:, None],
                  ((z | 0x6400) * 0x10001)[None, :], PTX)
        acc += s[None, :] * d
        words = next_words
    total = tl.sum(acc, 0)[None, :]
    offs_m = tl.arange(0, 1)
    _write_out(total, offs_m, offs_n, offs_m < 1, n_mask, 1, N, bias_ptr, out_ptr, N, ws_ptr,
               lock_ptr, SPLIT_K, HAS_BIAS)


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
