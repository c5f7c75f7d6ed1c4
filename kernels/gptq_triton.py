"""GPTQ linear in Triton: a fused dequant-GEMM for small batches, dequantize-then-matmul for
large ones. Same contract as :func:`optgptq_kernels.gptq.gptq_linear_ref`.

One row (decode at batch 1) with aligned groups takes a GEMV kernel
(:mod:`optgptq_kernels.gptq_triton_gemv`): no tensor cores, four packed rows a slice so that
each thread holds few rows and many columns. 4-bit codes with float16 inputs on NVIDIA GPUs
are dotted in float16 pairs by inline PTX (``gemv_half2``); otherwise a code is made a float by
one LOP3 and multiplied in one FFMA (``gemv``).

Fused path (``M <= FUSED_MAX_M``): program ``(m, n, k)`` computes a ``BLOCK_M x BLOCK_N``
output tile over every ``SPLIT_K``-th ``BLOCK_K`` slice of the input dimension. With ``SPLIT_K >
1`` (the GPU would idle on ``M x N`` tiles alone) the last program of a tile to finish sums the
others' float32 partials, so no zeroed buffer or second kernel is needed. Four ways to form a
slice's product:

- ``unpacked`` (aligned groups of 2/4/8 bits, more than 16 rows): the slice's packed rows are
  loaded once and unpacked in registers into the ``BLOCK_K x BLOCK_N`` tile in input order,
  dequantized in the activation dtype and multiplied in one ``tl.dot``; the next slice's codes
  are prefetched into registers. On an H100 at 64 rows this ran 1.2-1.3x faster than the
  ``GROUP_ALIGNED`` way below, which reads each word once per code.
- ``GROUP_ALIGNED`` (no act-order, ``BLOCK_K`` divides the group size): the slice lies in one
  group, so ``x . ((q - z) s) = s (x . (OFFSET + q) - (OFFSET + z) sum(x))``. The dot runs on
  the raw codes made exact floats by bit pattern (``0x6400 | q`` is ``1024 + q`` in float16,
  ``0x4300 | q`` is ``128 + q`` in bfloat16), and scale and zero are applied once per slice.
- per shift, for up to 16 rows of 2/4/8 bits (the ``swapped`` kernel): the slice's packed rows
  are loaded once and shift ``j`` of every word (inputs ``k0 + PER * i + j``) meets the matching
  strided columns of ``x`` in its own ``tl.dot``, so codes are never reordered in registers. It
  computes ``out^T = W^T x^T``, so the codes are the dot's wide operand, taken from registers
  (on an H200 this beat the untransposed per-shift dot by 10-30% at 4-16 rows).
- otherwise (act-order, ragged groups) each row's scale and zero are gathered through ``g_idx``
  and the dequantized tile is rounded to the activation dtype before the dot.

3-bit codes straddle words and are read from the pair of words that holds them. Large batches
are compute-bound: the weight is dequantized once per call into a dense copy and multiplied by
``torch.matmul``.
"""

from __future__ import annotations

import torch
import triton
from triton.runtime.errors import OutOfResources

from optgptq_kernels.gptq import check_bits
from optgptq_kernels.gptq_triton_gemv import gemv_half2_kernel, gemv_kernel
from optgptq_kernels.gptq_triton_kernels import (dequant_kernel, fused_kernel, swapped_kernel,
                                                  unpacked_kernel)

FUSED_MAX_M = 64
GEMV_BLOCK_N, GEMV_WARPS = 512, 4   # the GEMVs' tile width and warps
GEMV_PROGRAMS = {"gemv": 4, "gemv_half2": 2}  # programs per SM (times 2, as _num_programs)


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


def _is_nvidia(device: torch.device) -> bool:
    """Compiled for an NVIDIA GPU (PTX), not a ROCm/DCU one or Triton's interpreter."""
    return device.type == "cuda" and torch.version.hip is None


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
    dequant_kernel[grid](qweight, qzeros, scales, g_idx, w, n, k,
                          qweight.stride(0), qzeros.stride(0), scales.stride(0), w.stride(0),
                          BITS=bits, BLOCK_K=block_k, BLOCK_N=64)
    return w


_LOCKS: dict[torch.device, list[torch.Tensor]] = {}


def _locks(device: torch.device, tiles: int) -> torch.Tensor:
    """Per-tile arrival counters for split-K, zero between calls (the last program resets its
    own). Grown on demand outside any graph capture (the first call of a shape comes first);
    outgrown buffers stay allocated, since captured CUDA graphs may still point at them. Calls
    must run in one stream order (the engine's do): two split-K calls running at once on two
    streams would count into the same counters."""
    buffers = _LOCKS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < tiles:
        buffers.append(torch.zeros(max(tiles, 1 << 16), dtype=torch.int32, device=device))
    return buffers[-1]


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
    gemv_k = 128 // bits  # the GEMV's slice: four packed rows (few rows per thread)
    gemv = m == 1 and bits != 3 and group_size > 0 and group_size % gemv_k == 0
    block_m = 1 if gemv else (16 if m <= 16 else (32 if m <= 32 else 64))
    unpacked = aligned and bits != 3 and block_m > 16
    per_shift = per_shift and block_m == 16  # the strided x loads only pay off for short x
    kernel = "gemv" if gemv else ("swapped" if per_shift else ("unpacked" if unpacked else "fused"))
    if (gemv and bits == 4 and x.dtype == torch.float16 and _is_nvidia(x.device)
            and x.data_ptr() % 4 == 0):  # it reads the input as 32-bit words
        kernel = "gemv_half2"
    # Tiling measured on an H200 (sweeps of `launch`): the GEMV wants long rows of words
    # and ~GEMV_PROGRAMS programs per SM, the per-shift dot wide tiles split along K until
    # the GPU holds ~2 programs per SM. The unpacked kernel (H100 sweep at 64 rows of
    # Llama-3-8B's shapes): 64-wide tiles of 128 inputs, split 4 ways along K at every shape.
    if gemv:
        block_k = gemv_k
        block_n = GEMV_BLOCK_N if x.device.type == "cuda" else 32
    elif x.device.type != "cuda":
        block_n = 32
    else:
        block_n = 256 if per_shift else (128 if m <= 16 else 64)
    target = _num_programs(x.device) * GEMV_PROGRAMS.get(kernel, 1)
    max_split = 64 if gemv else 16
    if unpacked:
        target, max_split = 1 << 30, 4
    while True:
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        split_k = 1
        while (split_k < max_split and tiles * split_k * 2 <= target
               and k // (block_k * split_k * 2) >= 1):
            split_k *= 2
        try:
            launch(x, qweight, qzeros, scales, g_idx, bits, bias, out, group_size, aligned,
                   kernel, block_m, block_n, block_k, split_k,
                   num_warps=GEMV_WARPS if gemv else 4)
            return out
        except OutOfResources:  # a device with less shared memory (e.g. a DCU's 64 KiB LDS)
            if block_n <= 16:
                raise
            block_n //= 2


def launch(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
           g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None, out: torch.Tensor,
           group_size: int, aligned: bool, kernel: str, block_m: int, block_n: int,
           block_k: int, split_k: int, num_warps: int = 4, num_stages: int = 3) -> None:
    """One launch of ``kernel`` (``gemv_half2``: one row, 4 bits, float16; ``gemv``: one row;
    ``swapped``; ``unpacked``; ``fused``; all but the last need aligned groups of 2/4/8 bits)
    with an explicit tiling (also used to tune it)."""
    m, k = x.shape
    n = out.shape[1]
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    ws = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    locks = _locks(x.device, grid[0] * grid[1]) if split_k > 1 else out
    bias_arg = bias if bias is not None else x
    if kernel == "gemv_half2":
        gemv_half2_kernel[grid](x, qweight, qzeros, scales, bias_arg, out, ws, locks, n, k,
                                qweight.stride(0), qzeros.stride(0), scales.stride(0),
                                GROUP=group_size, BLOCK_N=block_n, ROWS=block_k // 8,
                                SPLIT_K=split_k, HAS_BIAS=bias is not None,
                                PTX=_is_nvidia(x.device), num_warps=num_warps)
        return
    if kernel == "gemv":
        gemv_kernel[grid](x, qweight, qzeros, scales, bias_arg, out, ws, locks, n, k,
                          group_size, 0x4B000000, qweight.stride(0), qzeros.stride(0),
                          scales.stride(0), BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k,
                          SPLIT_K=split_k, HAS_BIAS=bias is not None, num_warps=num_warps,
                          num_stages=num_stages)
        return
    offset = 0
    if aligned and x.dtype == torch.float16:
        offset = 1024
    elif aligned and x.dtype == torch.bfloat16 and bits < 8:
        offset = 128
    if kernel in ("unpacked", "swapped"):
        body = unpacked_kernel if kernel == "unpacked" else swapped_kernel
        body[grid](x, qweight, qzeros, scales, bias_arg, out, ws, locks, m, n, k, group_size,
                   x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0),
                   out.stride(0), BITS=bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                   SPLIT_K=split_k, OFFSET=offset, HAS_BIAS=bias is not None,
                   IEEE=x.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages)
        return
    fused_kernel[grid](x, qweight, qzeros, scales, g_idx, bias_arg, out, ws, locks,
                        m, n, k, max(group_size, 1), x.stride(0), qweight.stride(0),
                        qzeros.stride(0), scales.stride(0), out.stride(0),
                        BITS=bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                        SPLIT_K=split_k, GROUP_ALIGNED=aligned, OFFSET=offset, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                        num_warps=num_warps, num_stages=num_stages)
