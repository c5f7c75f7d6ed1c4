"""Binary-coded (BCQ) linear in Triton: LUT-GEMM for a few rows, bit-plane tensor-core GEMM for
small batches, dequantize-then-matmul for large ones. Same contract as
:func:`optgptq_kernels.bcq.bcq_linear_ref`.

With ``x`` summed over a group's inputs (``sum x``) and ``bits_i`` the 0/1 matrix of plane
``i``, a group contributes ``offset * sum x + sum_i alpha_i (2 x . bits_i - sum x)`` per column
(:mod:`optgptq_kernels.bcq`). Every slice of ``BLOCK_K`` inputs (32, 64 or 128: the largest
dividing the group size) lies inside one group, so alphas and offsets are read once per slice.

- ``lut`` (``M <= LUT_MAX_M[bits]``; decode): a small kernel first tabulates, for each run of 8
  inputs of a row, the sums of all 256 subsets (``[M, K / 8, 256]`` float32, 1 KiB per 8 inputs;
  read from L1/L2 by every column tile). Then each byte of a plane word is one table lookup
  that stands for 8 multiply-adds, so a weight costs ``bits / 8`` lookups per row instead of an
  unpack and a multiply-add per plane: the LUT-GEMM the GPTQT paper runs its binary codes with.
  One program per (column tile, split-K part) serves all rows, unpacking each word once.
- ``dot`` (``M <= FUSED_MAX_M``): per plane, the plane's bits as exact 0/1 values of ``x``'s
  dtype meet ``x`` in one ``tl.dot``; no rounding of dequantized weights.
- ``dense`` (larger ``M``, compute-bound): the weight is dequantized once into ``x``'s dtype and
  multiplied by ``torch.matmul``.

The first two split long inputs over programs (``SPLIT_K``) and reduce as the GPTQ kernels do
(the last program of a tile sums the float32 partials; :mod:`optgptq_kernels.gptq_triton`).
"""

from __future__ import annotations

import torch
import triton
from triton.runtime.errors import OutOfResources

from optgptq_kernels.bcq import check_layout, group_width, num_groups
from optgptq_kernels.bcq_triton_kernels import (dequant_kernel, dot_gemm_kernel, lut_gemm_kernel,
                                                lut_kernel)
from optgptq_kernels.gptq_triton import _locks, _num_programs

# Switch points measured on an H200 (bench/gptqt_kernels.py, Llama-3-8B shapes): the table
# pays off up to 4 rows of 2-bit codes but only for one row of 3-bit codes (at 4 rows the
# bit-plane dot was 1.4-1.5x faster); past 16 rows dequantize-then-matmul beat the dot.
LUT_MAX_M = {2: 4, 3: 1}
FUSED_MAX_M = 16
PATHS = ("lut", "dot", "dense")


def _block_k(group: int) -> int:
    return next(b for b in (128, 64, 32) if group % b == 0)


def dequantize_bcq_triton(planes: torch.Tensor, alphas: torch.Tensor, offsets: torch.Tensor,
                          group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[K, N]`` weight in ``dtype``."""
    bits, rows, n = planes.shape
    k = rows * 32
    check_layout(bits, k, group_size)
    w = torch.empty((k, n), dtype=dtype, device=planes.device)
    grid = (triton.cdiv(k, 64), triton.cdiv(n, 64))
    dequant_kernel[grid](planes, alphas, offsets, w, n, k, group_width(k, group_size),
                         planes.stride(0), alphas.stride(0), w.stride(0), BITS=bits, BLOCK_K=64,
                         BLOCK_N=64)
    return w


def _split_k(tiles: int, target: int, k: int, block_k: int) -> int:
    split_k = 1
    while split_k < 16 and tiles * split_k * 2 <= target and k // (block_k * split_k * 2) >= 2:
        split_k *= 2
    return split_k


def bcq_linear_triton(x: torch.Tensor, planes: torch.Tensor, alphas: torch.Tensor,
                      offsets: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, path: str | None = None,
                      block_n: int | None = None) -> torch.Tensor:
    """``x [M, K] @ W [K, N] (+ bias)`` into ``out`` (allocated when None) of ``x``'s dtype.

    ``path`` (one of ``PATHS``) and ``block_n`` override the choice by ``M`` and the tiling
    (tests and tuning)."""
    m, k = x.shape
    bits, _, n = planes.shape
    check_layout(bits, k, group_size)
    if planes.shape[1] * 32 != k:
        raise ValueError(f"x has {k} features, the planes hold {planes.shape[1] * 32}")
    groups = num_groups(k, group_size)
    if alphas.shape != (groups, bits, n) or offsets.shape != (groups, n):
        raise ValueError(f"alphas {tuple(alphas.shape)} / offsets {tuple(offsets.shape)} do not "
                         f"match {groups} groups of {bits} planes x {n} columns")
    if path is None:
        path = "lut" if m <= LUT_MAX_M[bits] else "dot" if m <= FUSED_MAX_M else "dense"
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
    if path == "dense":
        w = dequantize_bcq_triton(planes, alphas, offsets, group_size, x.dtype)
        if bias is None:
            return torch.matmul(x, w, out=out)
        return torch.addmm(bias.to(x.dtype), x, w, out=out)
    x = x.contiguous()
    group = group_width(k, group_size)
    block_k = _block_k(group)
    on_gpu = x.device.type == "cuda"
    bias_arg = bias if bias is not None else x
    if path == "lut":
        lut = torch.empty((m, k // 8, 256), dtype=torch.float32, device=x.device)
        lut_kernel[(m, triton.cdiv(k // 8, 16))](x, lut, k, x.stride(0), BLOCK_C=16)
        block_m = triton.next_power_of_2(m)
        block_n = block_n or (256 if on_gpu else 64)   # the interpreter's cost is per op
    else:
        block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
        block_n = block_n or (128 if on_gpu and m <= 16 else 64 if on_gpu else 32)
    num_stages = 3
    while True:
        try:
            _launch(path, x, lut if path == "lut" else None, planes, alphas, offsets, bias,
                    bias_arg, out, m, n, k, bits, group, block_m, block_n, block_k, num_stages)
            break
        except OutOfResources:   # shared memory: shallower pipeline, then narrower tiles
            if num_stages > 1:
                num_stages -= 1
            elif block_n > 16:
                block_n //= 2
            else:
                raise
    return out


def _launch(path: str, x: torch.Tensor, lut: torch.Tensor | None, planes: torch.Tensor,
            alphas: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None,
            bias_arg: torch.Tensor, out: torch.Tensor, m: int, n: int, k: int, bits: int,
            group: int, block_m: int, block_n: int, block_k: int, num_stages: int) -> None:
    """One launch of the LUT or bit-plane kernel with an explicit tiling."""
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = _split_k(tiles, _num_programs(x.device) * (2 if path == "lut" else 1), k, block_k)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    ws = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    locks = _locks(x.device, grid[0] * grid[1]) if split_k > 1 else out
    if path == "lut":
        lut_gemm_kernel[grid](lut, planes, alphas, offsets, bias_arg, out, ws, locks, m, n, k,
                              group, planes.stride(0), alphas.stride(0), out.stride(0),
                              BITS=bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                              SPLIT_K=split_k, HAS_BIAS=bias is not None,
                              num_stages=num_stages)
    else:
        dot_gemm_kernel[grid](x, planes, alphas, offsets, bias_arg, out, ws, locks, m, n, k,
                              group, x.stride(0), planes.stride(0), alphas.stride(0),
                              out.stride(0), BITS=bits, BLOCK_M=block_m, BLOCK_N=block_n,
                              BLOCK_K=block_k, SPLIT_K=split_k, HAS_BIAS=bias is not None,
                              IEEE=x.dtype == torch.float32, num_stages=num_stages)
