"""DGQ A8W4 linear in Triton: per-token INT8 activations, then one INT8 GEMM. Same contract and
the same bits as :func:`optgptq_kernels.dgq.dgq_linear_ref` (layout in :mod:`optgptq_kernels.dgq`).

Two kernels per call:

1. ``act_quant_kernel``, one program per row: ``xs = x / t``, the row's absolute maximum, then
   ``x8`` and ``s_tok`` (a row of up to 16384 inputs is read once and held in registers, a
   longer one is read twice in ``BLOCK`` chunks; divisions correctly rounded,
   ``tl.math.div_rn``, so the result equals the reference bit for bit).
2. the product, by one of two paths:

   - fused (``M <= INT_MM_MIN_M``, or where ``torch._int_mm`` does not apply): program ``(m,
     n, k)`` walks every ``SPLIT_K``-th ``BLOCK_K`` slice of the input dimension (split-K while
     the output tiles alone would leave the GPU idle; the int32 partials are summed exactly by
     the tile's last program); each slice's packed rows are loaded once, the eight 4-bit codes
     of every word are unpacked by broadcasting against the shifts (``[BLOCK_K / 8, 8,
     BLOCK_N]`` reshaped to ``[BLOCK_K, BLOCK_N]``, the natural row order), turned into INT8 in
     registers (``u * (q - z)``, with the slice's one group row of ``u``
     and ``z`` when ``BLOCK_K`` divides the group size, else gathered per row) and multiplied
     by ``tl.dot`` on int8 into int32 accumulators. The epilogue applies ``s_tok``, ``s_c`` and
     the bias.
   - ``torch._int_mm`` (CUDA, ``M > INT_MM_MIN_M``): ``dequant_kernel`` writes the INT8 weight
     once per call, K-major (cuBLASLt's int8 GEMM is fast only when both operands are; a
     row-major ``[K, N]`` weight ran 7-10x slower on an H200), cuBLASLt multiplies, and
     ``rescale_kernel`` runs the same epilogue.

Integer products are exact in any order, and the epilogue is the reference's float32 sequence,
so both paths match the reference up to the rounding of the final bias add (a fused multiply-add
on a GPU may skip one rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from optgptq_kernels.dgq import MIN_AMAX, check_shapes, group_width

INT_MM_MIN_M = 256   # fused kernel up to this many rows, torch._int_mm above (where it applies)
_MIN_AMAX = tl.constexpr(MIN_AMAX)


@triton.jit
def _smoothed(x_ptr, t_ptr, row, stride_x, offs, mask):
    """``x / t`` (correctly rounded) of inputs ``offs`` of a row, float32."""
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    return tl.math.div_rn(x, t)


@triton.jit
def _quantize_row(xs, s):
    v = tl.math.div_rn(xs, s)
    r = tl.floor(tl.abs(v) + 0.5)
    q = tl.minimum(tl.where(v < 0, -r, r), 127.0)
    return tl.maximum(q, -127.0).to(tl.int8)


@triton.jit
def act_quant_kernel(x_ptr, t_ptr, x8_ptr, s_ptr, K, stride_x, stride_x8,
                     BLOCK: tl.constexpr):
    """One row per program. A row that fits in ``BLOCK`` is read once and kept in registers;
    a longer one is read twice (its absolute maximum, then its codes)."""
    row = tl.program_id(0)
    if BLOCK >= K:
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        xs = _smoothed(x_ptr, t_ptr, row, stride_x, offs, mask)
        s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(xs), 0), _MIN_AMAX), 127.0)
        tl.store(s_ptr + row, s)
        tl.store(x8_ptr + row * stride_x8 + offs, _quantize_row(xs, s), mask=mask)
    else:
        amax = tl.zeros([BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(_smoothed(x_ptr, t_ptr, row, stride_x, offs,
                                                     offs < K)))
        s = tl.math.div_rn(tl.maximum(tl.max(amax, 0), _MIN_AMAX), 127.0)
        tl.store(s_ptr + row, s)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            xs = _smoothed(x_ptr, t_ptr, row, stride_x, offs, offs < K)
            tl.store(x8_ptr + row * stride_x8 + offs, _quantize_row(xs, s), mask=offs < K)


@triton.jit
def _int8_tile(qw_ptr, qz_ptr, qs_ptr, k0, K, offs_n, n_mask, group_size, stride_qw, stride_g,
               BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_ALIGNED: tl.constexpr):
    """The INT8 weight ``u * (q - z)`` of rows ``k0 .. k0 + BLOCK_K`` (zero past ``K``)."""
    rows = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    words = tl.load(qw_ptr + rows[:, None] * stride_qw + offs_n[None, :],
                    mask=(rows * 8 < K)[:, None] & n_mask[None, :], other=0)
    shifts = tl.arange(0, 8) * 4
    q = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
    if GROUP_ALIGNED:
        g = k0 // group_size
        z = tl.load(qz_ptr + g * stride_g + offs_n, mask=n_mask, other=0).to(tl.int32)
        u = tl.load(qs_ptr + g * stride_g + offs_n, mask=n_mask, other=0).to(tl.int32)
        w = u[None, :] * (q - z[None, :])
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_k < K)[:, None] & n_mask[None, :]
        g = (offs_k // group_size)[:, None] * stride_g + offs_n[None, :]
        z = tl.load(qz_ptr + g, mask=mask, other=0).to(tl.int32)
        u = tl.load(qs_ptr + g, mask=mask, other=0).to(tl.int32)
        w = u * (q - z)
    return w.to(tl.int8)


@triton.jit
def _epilogue(acc, offs_m, offs_n, m_mask, n_mask, s_ptr, sc_ptr, bias_ptr, out_ptr, stride_om,
              HAS_BIAS: tl.constexpr):
    """``(float32(acc) * s_tok) * s_c (+ bias)`` stored in the output's dtype."""
    s_tok = tl.load(s_ptr + offs_m, mask=m_mask, other=0.0)
    s_c = tl.load(sc_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = (acc.to(tl.float32) * s_tok[:, None]) * s_c[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
             y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def gemm_kernel(x8_ptr, s_ptr, qw_ptr, qz_ptr, qs_ptr, sc_ptr, bias_ptr, out_ptr, ws_ptr,
                lock_ptr, M, N, K, group_size, stride_x8, stride_qw, stride_g, stride_om,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SPLIT_K: tl.constexpr, GROUP_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Program ``(m, n, k)``: the int32 product of an output tile over every ``SPLIT_K``-th
    slice. With ``SPLIT_K > 1`` each program stores its int32 partial and counts itself in on
    the tile's lock; the last to arrive sums the partials (exactly: integers), runs the
    epilogue and resets the lock to zero for the next call."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x8_ptr + offs_m[:, None] * stride_x8 + offs_k[None, :],
                    mask=m_mask[:, None] & (offs_k < K)[None, :], other=0)
        w = _int8_tile(qw_ptr, qz_ptr, qs_ptr, k0, K, offs_n, n_mask, group_size, stride_qw,
                       stride_g, BLOCK_K, BLOCK_N, GROUP_ALIGNED)
        acc = tl.dot(x, w, acc, out_dtype=tl.int32)
    if SPLIT_K > 1:
        mask = m_mask[:, None] & n_mask[None, :]
        tile = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * M * N + tile, acc, mask=mask)
        tl.debug_barrier()
        lock = lock_ptr + pid_m * tl.num_programs(1) + pid_n
        if tl.atomic_add(lock, 1, sem="acq_rel") == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
            for part in range(0, SPLIT_K):
                acc += tl.load(ws_ptr + part * M * N + tile, mask=mask, other=0,
                               cache_modifier=".cg")
            _epilogue(acc, offs_m, offs_n, m_mask, n_mask, s_ptr, sc_ptr, bias_ptr, out_ptr,
                      stride_om, HAS_BIAS)
            tl.atomic_xchg(lock, 0)
    else:
        _epilogue(acc, offs_m, offs_n, m_mask, n_mask, s_ptr, sc_ptr, bias_ptr, out_ptr,
                  stride_om, HAS_BIAS)


@triton.jit
def dequant_kernel(qw_ptr, qz_ptr, qs_ptr, w_ptr, N, K, group_size, stride_qw, stride_g,
                   stride_wk, stride_wn, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                   GROUP_ALIGNED: tl.constexpr):
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w = _int8_tile(qw_ptr, qz_ptr, qs_ptr, k0, K, offs_n, n_mask, group_size, stride_qw,
                   stride_g, BLOCK_K, BLOCK_N, GROUP_ALIGNED)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn, w,
             mask=(offs_k < K)[:, None] & n_mask[None, :])


def quantize_activations_triton(x: torch.Tensor, smooth: torch.Tensor, max_block: int = 16384
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x8 [M, K]`` int8 and ``s_tok [M]`` float32, as :func:`quantize_activations_ref`; rows
    up to ``max_block`` inputs are read once."""
    m, k = x.shape
    x8 = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s_tok = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block = min(triton.next_power_of_2(k), max_block)
        act_quant_kernel[(m,)](x, smooth, x8, s_tok, k, x.stride(0), x8.stride(0), BLOCK=block,
                               num_warps=max(4, min(16, block // 1024)))
    return x8, s_tok


def _block_k(k: int, group_size: int) -> tuple[int, bool]:
    """The slice width and whether every slice lies in one group."""
    width = group_width(k, group_size)
    for block_k in (128, 64, 32):
        if width % block_k == 0:
            return block_k, True
    return 64, False


def dequantize_int8_triton(qweight: torch.Tensor, qzeros: torch.Tensor, qscales: torch.Tensor,
                           group_size: int) -> torch.Tensor:
    """The INT8 weight ``[K, N]`` (as :func:`int8_weight_ref`, without its range check), stored
    column-major (the transpose of a contiguous ``[N, K]``): the layout of ``torch._int_mm``'s
    fast path (cuBLASLt's int8 GEMM wants both operands K-major)."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    block_k, aligned = _block_k(k, group_size)
    w = torch.empty((n, k), dtype=torch.int8, device=qweight.device)
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, 64))
    dequant_kernel[grid](qweight, qzeros, qscales, w, n, k, group_width(k, group_size),
                         qweight.stride(0), qzeros.stride(0), 1, w.stride(0), BLOCK_K=block_k,
                         BLOCK_N=64, GROUP_ALIGNED=aligned)
    return w.t()


def _tiles(m: int, device: torch.device) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for ``m`` rows."""
    if device.type != "cuda":
        return 16, 32, 4, 1
    if m <= 16:
        return 16, 64, 4, 4
    if m <= 64:
        return 64, 64, 4, 4
    return 128, 128, 4, 4


_LOCKS: dict[torch.device, list[torch.Tensor]] = {}


def _locks(device: torch.device, tiles: int) -> torch.Tensor:
    """Per-tile arrival counters for split-K, zero between calls (the last program of a tile
    resets its own). Grown on demand outside any graph capture (the first call of a shape comes
    first); outgrown buffers stay allocated, since captured CUDA graphs may still point at them."""
    buffers = _LOCKS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < tiles:
        buffers.append(torch.zeros(max(tiles, 1 << 16), dtype=torch.int32, device=device))
    return buffers[-1]


def _split_k(tiles: int, k: int, block_k: int, device: torch.device) -> int:
    """Split the input dimension until the GPU holds about two programs per SM."""
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 8
    split = 1
    while split < 16 and tiles * split * 2 <= target and k // (block_k * split * 2) >= 2:
        split *= 2
    return split


def gemm_triton(x8: torch.Tensor, s_tok: torch.Tensor, qweight: torch.Tensor,
                qzeros: torch.Tensor, qscales: torch.Tensor, scales: torch.Tensor,
                group_size: int, bias: torch.Tensor | None, out: torch.Tensor,
                tiles: tuple[int, int, int, int] | None = None,
                split_k: int | None = None) -> torch.Tensor:
    """The fused INT8 GEMM and epilogue into ``out`` (``tiles`` and ``split_k`` override the
    defaults of :func:`_tiles` and :func:`_split_k`)."""
    m, k = x8.shape
    n = scales.shape[0]
    block_k, aligned = _block_k(k, group_size)
    block_m, block_n, warps, stages = tiles or _tiles(m, x8.device)
    grid_mn = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = split_k or _split_k(grid_mn, k, block_k, x8.device)
    ws = torch.empty((split, m, n), dtype=torch.int32, device=x8.device) if split > 1 else out
    locks = _locks(x8.device, grid_mn) if split > 1 else out
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    gemm_kernel[grid](x8, s_tok, qweight, qzeros, qscales, scales,
                      bias if bias is not None else scales, out, ws, locks, m, n, k,
                      group_width(k, group_size), x8.stride(0), qweight.stride(0),
                      qzeros.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                      BLOCK_K=block_k, SPLIT_K=split, GROUP_ALIGNED=aligned,
                      HAS_BIAS=bias is not None, num_warps=warps, num_stages=stages)
    return out


def int_mm_applies(m: int, k: int, n: int, device: torch.device) -> bool:
    """Whether ``torch._int_mm`` takes this product (CUDA: more than 16 rows, K and N multiples
    of 8)."""
    return device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0


@triton.jit
def rescale_kernel(acc_ptr, s_ptr, sc_ptr, bias_ptr, out_ptr, M, N, stride_am, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.load(acc_ptr + offs_m[:, None] * stride_am + offs_n[None, :],
                  mask=m_mask[:, None] & n_mask[None, :], other=0)
    _epilogue(acc, offs_m, offs_n, m_mask, n_mask, s_ptr, sc_ptr, bias_ptr, out_ptr, stride_om,
              HAS_BIAS)


def int_mm_path(x8: torch.Tensor, s_tok: torch.Tensor, w8: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``torch._int_mm`` on a dequantized INT8 weight, then the epilogue in one kernel (the
    reference's float32 sequence, without its four passes over the int32 product)."""
    acc = torch._int_mm(x8, w8)
    m, n = acc.shape
    out = torch.empty((m, n), dtype=dtype, device=acc.device)
    grid = (triton.cdiv(m, 32), triton.cdiv(n, 128))
    rescale_kernel[grid](acc, s_tok, scales, bias if bias is not None else scales, out, m, n,
                         acc.stride(0), out.stride(0), BLOCK_M=32, BLOCK_N=128,
                         HAS_BIAS=bias is not None)
    return out


def dgq_linear_triton(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                      qscales: torch.Tensor, scales: torch.Tensor, smooth: torch.Tensor,
                      group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] -> y [M, N]`` in ``x``'s dtype (module docstring)."""
    k, n = check_shapes(qweight, qzeros, qscales, scales, smooth, group_size)
    m = x.shape[0]
    x8, s_tok = quantize_activations_triton(x.contiguous(), smooth)
    if m > INT_MM_MIN_M and int_mm_applies(m, k, n, x.device):
        w8 = dequantize_int8_triton(qweight, qzeros, qscales, group_size)
        return int_mm_path(x8, s_tok, w8, scales, bias, x.dtype)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    return gemm_triton(x8, s_tok, qweight, qzeros, qscales, scales, group_size, bias, out)

