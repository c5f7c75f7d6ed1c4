"""The binary-coded (BCQ) weight format of GPTQT checkpoints and its PyTorch reference.

A weight of ``bits`` bit planes stands, per group of ``group_size`` input rows and per output
column, for ``offset + sum_i alpha_i * b_i`` with ``b_i`` in ``{-1, +1}``: ``2**bits`` levels
that need no integer grid at inference. For ``y = x @ W`` with ``W`` of shape ``[K, N]`` (in x
out features, the transpose of ``nn.Linear.weight``):

- ``planes`` int32 ``[bits, K / 32, N]``: bit ``j`` of ``planes[i, r, n]`` is plane ``i`` of input
  row ``32 r + j`` in column ``n`` (1 for ``+1``, 0 for ``-1``). Packing along the input dimension
  keeps a column's bits in one 32-bit word per plane and row block, so a kernel reads a slice of
  one plane as whole coalesced words along ``N``, and each byte of a word indexes a 256-entry
  lookup table of partial sums of 8 inputs (LUT-GEMM), with no code straddling two words at any
  bit width. ``K`` must be a multiple of 32.
- ``alphas`` float16 ``[groups, bits, N]`` and ``offsets`` float16 ``[groups, N]``: per group and
  column, the plane scales and the offset; row ``k`` belongs to group ``k // group_size``
  (``group_size = -1``: one group). ``group_size`` is a multiple of 32 so that a word never
  spans two groups; the last group may be short.

A weight's *code* is the integer whose bit ``i`` is plane ``i``'s bit; its value is
``offsets[g, n] + sum_i alphas[g, i, n] * (2 * bit_i - 1)``, computed in float32 (see
:func:`levels`). The product splits into the sum of ``x`` over a group times
``offset - sum_i alpha_i`` plus, per plane, ``2 alpha_i`` times ``x . bits_i``: the kernels'
identity (:mod:`optgptq_kernels.bcq_triton`).
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3)


def check_layout(bits: int, in_features: int, group_size: int) -> None:
    """``ValueError`` unless ``bits`` planes of ``in_features`` rows in groups of ``group_size``
    fit the layout (module docstring)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS} binary-coding planes, got {bits}")
    if in_features % 32:
        raise ValueError(f"in_features={in_features}: binary-coded planes pack 32 input rows "
                         f"per int32 word, so it must be a multiple of 32")
    if group_size != -1 and (group_size < 32 or group_size % 32):
        raise ValueError(f"group_size must be a positive multiple of 32 or -1 (one group), "
                         f"got {group_size}")


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def group_width(in_features: int, group_size: int) -> int:
    return in_features if group_size == -1 else group_size


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[K, N]`` (0 <= code < 2**bits) -> int32 planes ``[bits, K / 32, N]``."""
    k, n = codes.shape
    check_layout(bits, k, -1)
    codes = codes.to(torch.int64)
    if int(codes.min()) < 0 or int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} planes")
    shifts = torch.arange(32, device=codes.device).view(1, 32, 1)
    planes = []
    for i in range(bits):
        bit = ((codes >> i) & 1).view(k // 32, 32, n)
        planes.append((bit << shifts).sum(1))
    words = torch.stack(planes)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_planes(planes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_planes`: int32 ``[bits, K / 32, N]`` -> int32 codes ``[K, N]``."""
    bits, rows, n = planes.shape
    words = planes.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32, device=planes.device).view(1, 1, 32, 1)
    bit = (words.unsqueeze(2) >> shifts) & 1                       # [bits, rows, 32, N]
    weights = (1 << torch.arange(bits, device=planes.device)).view(bits, 1, 1, 1)
    return (bit * weights).sum(0).view(rows * 32, n).to(torch.int32)


def levels(alphas: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The float32 value of every code: ``[groups, N, 2**bits]`` from ``alphas [groups, bits, N]``
    and ``offsets [groups, N]``, summed as the kernels do: the offset, then plane by plane."""
    bits = alphas.shape[1]
    codes = torch.arange(1 << bits, device=alphas.device)
    out = offsets.float().unsqueeze(-1).expand(*offsets.shape, 1 << bits)
    for i in range(bits):
        sign = (((codes >> i) & 1) * 2 - 1).float()
        out = out + alphas[:, i].float().unsqueeze(-1) * sign
    return out


def dequantize_bcq_ref(planes: torch.Tensor, alphas: torch.Tensor, offsets: torch.Tensor,
                       group_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense ``[K, N]`` weight, computed in float32 and rounded once to ``dtype`` (default:
    ``alphas``' dtype)."""
    codes = unpack_planes(planes).long()
    k, n = codes.shape
    g = torch.arange(k, device=planes.device) // group_width(k, group_size)
    table = levels(alphas, offsets)                                # [groups, N, 2**bits]
    cols = torch.arange(n, device=planes.device)
    return table[g.unsqueeze(1), cols.unsqueeze(0), codes].to(dtype or alphas.dtype)


def bcq_linear_ref(x: torch.Tensor, planes: torch.Tensor, alphas: torch.Tensor,
                   offsets: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ W [K, N] (+ bias)`` with ``W`` dequantized; computed in ``x``'s dtype."""
    w = dequantize_bcq_ref(planes, alphas, offsets, group_size, x.dtype)
    out = x @ w
    return out + bias.to(x.dtype) if bias is not None else out
