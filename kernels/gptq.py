"""The GPTQ weight format and its PyTorch reference: packing, dequantization, the linear op.

The layout is the one GPTQ checkpoints use (AutoGPTQ / gptqmodel ``checkpoint_format: gptq``,
loaded by transformers and vLLM), for a linear layer ``y = x @ W`` with ``W`` of shape
``[K, N]`` (in features x out features, i.e. the transpose of ``nn.Linear.weight``):

- ``qweight`` int32 ``[K * bits / 32, N]``: column ``n`` holds ``W[:, n]``'s integer codes as one
  little-endian bit stream, ``bits`` bits per input row, rows in order. For 2, 4 and 8 bits a
  word holds ``32 / bits`` whole codes; for 3 bits 32 codes fill 3 words and some codes straddle
  two words (that is AutoGPTQ's 3-bit layout too).
- ``qzeros`` int32 ``[num_groups, N * bits / 32]``: the zero points, packed the same way along
  the output dimension, stored minus one (the "v1" convention of the format).
- ``scales`` float16 ``[num_groups, N]``.
- ``g_idx`` int32 ``[K]``: the group of each input row. Without act-order it is ``k //
  group_size``; with act-order (``desc_act``) rows were quantized in a permuted order and their
  groups are arbitrary. ``group_size = -1`` (per channel) is one group; a group size that does
  not divide ``K`` leaves a short last group.

Dequantization: ``W[k, n] = scales[g, n] * (q[k, n] - (z[g, n] + 1))`` with ``g = g_idx[k]``.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``[R, C]`` (0 <= code < 2**bits) -> int32 ``[R * bits / 32, C]`` bit streams."""
    check_bits(bits)
    rows, cols = codes.shape
    if rows * bits % 32:
        raise ValueError(f"{rows} rows of {bits}-bit codes do not fill whole 32-bit words "
                         f"(for 3 bits the row count must be a multiple of 32)")
    codes = codes.to(torch.int64)
    if int(codes.min()) < 0 or int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits")
    padded = torch.cat([codes, codes.new_zeros((-rows) % 32, cols)])
    chunks = padded.view(-1, 32, cols)                 # 32 codes fill exactly `bits` words
    words = torch.zeros(chunks.shape[0], bits, cols, dtype=torch.int64, device=codes.device)
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        words[:, word] |= (chunks[:, i] << shift) & 0xFFFFFFFF
        if shift + bits > 32:                          # the code straddles into the next word
            words[:, word + 1] |= chunks[:, i] >> (32 - shift)
    words = words.view(-1, cols)[: rows * bits // 32]
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[rows * bits / 32, C]`` -> int32 codes ``[rows, C]``."""
    check_bits(bits)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    # Append a zero word so a code straddling the last word boundary reads a valid neighbour.
    words = torch.cat([words, torch.zeros_like(words[:1])])
    first = torch.arange(rows, device=packed.device) * bits
    idx, shift = first // 32, (first % 32).unsqueeze(1)
    pair = words[idx] | (words[idx + 1] << 32)
    return ((pair >> shift) & ((1 << bits) - 1)).to(torch.int32)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[R, C]`` -> int32 ``[R, C * bits / 32]``, packed along the columns (qzeros)."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    return unpack_rows(packed.t(), bits, cols).t()


def dequantize_ref(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor, bits: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense ``[K, N]`` weight, computed in float32 and rounded once to ``dtype``
    (default: ``scales``' dtype)."""
    k, n = g_idx.shape[0], scales.shape[1]
    q = unpack_rows(qweight, bits, k)
    z = unpack_cols(qzeros, bits, n) + 1
    g = g_idx.long()
    return (scales.float()[g] * (q - z[g]).float()).to(dtype or scales.dtype)


def gptq_linear_ref(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                    scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ W [K, N] (+ bias)`` with ``W`` dequantized; computed in ``x``'s dtype."""
    w = dequantize_ref(qweight, qzeros, scales, g_idx, bits, x.dtype)
    out = x @ w
    return out + bias.to(x.dtype) if bias is not None else out
