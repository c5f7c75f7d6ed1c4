"""The binary-coded (BCQ) Triton kernels (the ``@triton.jit`` functions); the algorithm and the
host code that picks a kernel and its tiling are in :mod:`optgptq_kernels.bcq_triton`."""

from __future__ import annotations

import triton
import triton.language as tl

from optgptq_kernels.gptq_triton_kernels import _write_out


@triton.jit
def lut_kernel(x_ptr, lut_ptr, K, stride_xm, BLOCK_C: tl.constexpr):
    """``lut[m, c, v] = sum_j x[m, 8 c + j] * bit_j(v)``: the sum of every subset of each run of 8
    inputs, in float32, added in the order ``j = 0..7``."""
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < K // 8
    v = tl.arange(0, 256)
    acc = tl.zeros([BLOCK_C, 256], tl.float32)
    for j in tl.static_range(8):
        xj = tl.load(x_ptr + pid_m * stride_xm + c * 8 + j, mask=c_mask, other=0.0)
        acc += xj.to(tl.float32)[:, None] * ((v >> j) & 1).to(tl.float32)[None, :]
    tl.store(lut_ptr + (pid_m * (K // 8) + c[:, None]) * 256 + v[None, :], acc,
             mask=c_mask[:, None])


@triton.jit
def lut_gemm_kernel(lut_ptr, pl_ptr, al_ptr, of_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
                    M, N, K, group_size, stride_plane, stride_ag, stride_om,
                    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """LUT-GEMM over ``BLOCK_M`` rows: each byte of a plane's word (unpacked once for all rows)
    picks, per row, the sum of its 8 inputs' ``+1`` subset from that row's table; a slice (inside
    one group) adds ``offset * sum x + sum_i alpha_i (2 * picked - sum x)``."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    R: tl.constexpr = BLOCK_K // 32
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    row_len = (K // 8) * 256
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        rows = k0 // 32 + tl.arange(0, R)
        tile_mask = (rows * 32 < K)[:, None] & n_mask[None, :]
        chunks = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        x_sum = tl.sum(tl.load(lut_ptr + offs_m[:, None] * row_len + chunks[None, :] * 256 + 255,
                               mask=m_mask[:, None] & (chunks * 8 < K)[None, :], other=0.0), 1)
        g = k0 // group_size
        offset = tl.load(of_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += x_sum[:, None] * offset[None, :]
        byte_shift = (8 * tl.arange(0, 4))[None, :, None]
        lut_rows = (rows[:, None] * 4 + tl.arange(0, 4)[None, :])[:, :, None] * 256
        for i in tl.static_range(BITS):
            words = tl.load(pl_ptr + i * stride_plane + rows[:, None] * N + offs_n[None, :],
                            mask=tile_mask, other=0)
            byte = lut_rows + ((words[:, None, :] >> byte_shift) & 0xFF)  # [R, 4, BLOCK_N]
            picked = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for mm in tl.static_range(BLOCK_M):
                row = pid_m * BLOCK_M + mm
                sums = tl.sum(tl.sum(tl.load(lut_ptr + row * row_len + byte,
                                             mask=tile_mask[:, None, :] & (row < M), other=0.0),
                                     1), 0)
                picked += tl.where((tl.arange(0, BLOCK_M) == mm)[:, None], sums[None, :], 0.0)
            alpha = tl.load(al_ptr + g * stride_ag + i * N + offs_n, mask=n_mask,
                            other=0.0).to(tl.float32)
            acc += alpha[None, :] * (2 * picked - x_sum[:, None])
    _write_out(acc, offs_m, offs_n, m_mask, n_mask, M, N, bias_ptr, out_ptr, stride_om, ws_ptr,
               lock_ptr, SPLIT_K, HAS_BIAS)


@triton.jit
def dot_gemm_kernel(x_ptr, pl_ptr, al_ptr, of_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
                    M, N, K, group_size, stride_xm, stride_plane, stride_ag, stride_om,
                    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                    IEEE: tl.constexpr):
    """A ``BLOCK_M x BLOCK_N`` tile on tensor cores: per plane, ``x`` meets the plane's bits as
    exact 0/1 values in one ``tl.dot``; alphas and offsets are applied in float32 per slice."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        x_sum = tl.sum(x.to(tl.float32), 1)[:, None]
        g = k0 // group_size
        offset = tl.load(of_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += x_sum * offset[None, :]
        tile_mask = k_mask[:, None] & n_mask[None, :]
        for i in tl.static_range(BITS):
            words = tl.load(pl_ptr + i * stride_plane + (offs_k // 32)[:, None] * N
                            + offs_n[None, :], mask=tile_mask, other=0)
            bits = ((words >> (offs_k % 32)[:, None]) & 1).to(x.dtype)
            if IEEE:
                part = tl.dot(x, bits, input_precision="ieee")
            else:
                part = tl.dot(x, bits)
            alpha = tl.load(al_ptr + g * stride_ag + i * N + offs_n, mask=n_mask,
                            other=0.0).to(tl.float32)
            acc += alpha[None, :] * (2 * part - x_sum)
    _write_out(acc, offs_m, offs_n, m_mask, n_mask, M, N, bias_ptr, out_ptr, stride_om, ws_ptr,
               lock_ptr, SPLIT_K, HAS_BIAS)


@triton.jit
def dequant_kernel(pl_ptr, al_ptr, of_ptr, w_ptr, N, K, group_size, stride_plane, stride_ag,
                   stride_w, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """``w[k, n] = offset + sum_i alpha_i (2 bit_i - 1)``, summed in float32 in plane order."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    g = (offs_k // group_size)[:, None]
    w = tl.load(of_ptr + g * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    for i in tl.static_range(BITS):
        words = tl.load(pl_ptr + i * stride_plane + (offs_k // 32)[:, None] * N + offs_n[None, :],
                        mask=mask, other=0)
        sign = ((words >> (offs_k % 32)[:, None]) & 1).to(tl.float32) * 2 - 1
        w += tl.load(al_ptr + g * stride_ag + i * N + offs_n[None, :], mask=mask,
                     other=0.0).to(tl.float32) * sign
    tl.store(w_ptr + offs_k[:, None] * stride_w + offs_n[None, :], w.to(w_ptr.dtype.element_ty),
             mask=mask)
