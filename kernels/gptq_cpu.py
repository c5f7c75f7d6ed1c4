"""GPTQ products on the CPU: the weight repacked once for the native INT8 kernel.

A GPTQ checkpoint (:mod:`optgptq_kernels.gptq`) packs each column's codes along the input
dimension, one int32 word per ``32 / bits`` input rows. :func:`pack_gptq_cpu` rewrites a
layer's tensors once, at load, for ``gptq_cpu.cpp``:

- rows are sorted by group, stably (act-order checkpoints: ``g_idx`` not ascending), every group
  padded with zero rows to a multiple of 8 and cut into *segments* of at most 64 rows; per call
  ``x``'s columns are gathered into that order (``src``, ``None`` when it is the identity);
- the codes become ``ceil(N / 64)`` panels of 64 output columns, each holding, per octet of 8
  rows, eight vectors of 64 unsigned bytes in the operand order of ``vpdpbusd`` (four rows of
  16 columns per vector), stored at the checkpoint's bit width (4 bits: 256 bytes per octet and
  panel, a nibble per code; byte layout per width in ``gptq_cpu.cpp``); padding columns get
  code 0 and scale 0;
- scales (float16) and stored zero points (uint8, the format's ``z - 1``) become ``[P, G, 64]``.

Numerics (``gptq_cpu.cpp``): ``x`` is quantized per row and segment to INT8 (scale = the
segment's absolute maximum / 127, round to nearest even); each segment's dot products with the
codes are exact in int32; ``(dot - z * sum(x8)) * s * s_x`` is added in float32. Against the
reference (dequantized float32 weight, float32 matmul) the difference is ``x``'s rounding, at
most half a step of its segment's scale per input. On 4096 tokens of Emma, SmolLM2-135M's 4-bit
g64 act-order checkpoint (``optgptq quantize``, 32 x 512 tokens of Pride and Prejudice) scores a
perplexity of 32.871 through this kernel against 32.696 with its dequantized weights (+0.5%;
the float model: 29.894). Scales per row instead of per segment had cost the float model 3.0%
(29.89 -> 30.78), per 64 inputs 0.26%. ``act_pieces=2`` (``OPTGPTQ_CPU_GPTQ_ACT=int16`` at the
dispatch point) adds a second INT8 piece holding piece one's rounding error in steps of 1/254:
``x`` within 1/32258 of its segment's maximum, outputs within ~3e-5 of the float product
(perplexity 32.696, as the dequantized weights), for twice the dot products.

Greedy tokens: with one piece they follow the reference's until a step's top two logits lie
closer than the activations' rounding moves them (on tiny random test models some steps' top
two are 0.02-0.04 apart at logits of ~10, and tokens there differ); with two pieces the engine's
greedy tokens equal the reference path's in tests (tests/test_gptq_cpu.py, in-order and
act-order checkpoints; tests/test_gptq_format.py, against the dense twin).

Why INT8, measured over SmolLM2's 30 layers of 4-bit g64 products (q/k/v 576 x 960, o 576 x 576,
gate/up 576 x 3072, down 1536 x 576), one thread, CPU time, weights streamed from memory,
alternating in one process, against the float32 panel kernel (``linear_cpu.cpp``) on the same
weights dequantized: a first kernel that dequantized 64 rows at a time in registers to exactly
the reference's float32 ``s * (q - z)`` and ran the float register tile over them (bit for bit
the float kernel's sums) took 12.8 / 91 / 411 ms at 1 / 64 / 256 rows (float32: 43.7 / 110 /
404 ms); this kernel takes 7.7 / 46 / 175 ms with one piece (5.6x / 2.4x / 2.1x float32) and
8.8 / 77 / 301 ms with two: INT8 won at every row count of a decode step and of prefill chunks,
two pieces included, so the float-dequantizing kernel was not kept. One piece is the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optgptq_kernels import cpu_native
from optgptq_kernels.gptq import check_bits, unpack_cols, unpack_rows

PANEL = 64
SEGMENT = 64  # packed rows per activation scale (and per rescale of the int32 sums)


@dataclass(frozen=True)
class PackedGPTQ:
    """A GPTQ weight in the native kernel's layout (module docstring)."""

    codes: torch.Tensor              # uint8 [P, K8 / 8, 64 * bits]
    scales: torch.Tensor             # float16 [P, G, 64]
    zeros: torch.Tensor              # uint8 [P, G, 64], stored zero points (z - 1)
    seg_rows: torch.Tensor           # int32 [S + 1]: segment bounds in packed rows (octets)
    seg_group: torch.Tensor          # int32 [S]: each segment's group
    src: torch.Tensor | None         # int32 [K8]: x's column of each packed row, -1: padding
    bits: int
    in_features: int
    out_features: int
    act_pieces: int                  # INT8 pieces per activation: 1 (INT8) or 2 (about 16 bits)


def _vectors(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[P, K8, 64]`` (int64) -> packed octets ``[P, K8 / 8, 64 * bits]`` (uint8)."""
    p, k8, _ = codes.shape
    # [P, octet, quad h, row i, vector c, column j] -> vectors (h, c) of bytes 4j + i
    v = codes.view(p, k8 // 8, 2, 4, 4, 16).permute(0, 1, 2, 4, 5, 3).reshape(p, k8 // 8, 2, 4, 64)
    if bits == 8:
        return v.reshape(p, k8 // 8, 512).to(torch.uint8)
    if bits == 4:
        return (v[:, :, 0] | v[:, :, 1] << 4).reshape(p, k8 // 8, 256).to(torch.uint8)
    low = sum((v[:, :, :, c] & 3) << (2 * c) for c in range(4)).reshape(p, k8 // 8, 128)
    if bits == 2:
        return low.to(torch.uint8)
    high = ((v >> 2) & 1).reshape(p, k8 // 8, 8, 8, 8)  # vector, byte of its 64-bit mask, bit
    high = sum(high[..., i] << i for i in range(8)).reshape(p, k8 // 8, 64)
    return torch.cat([low, high], dim=2).to(torch.uint8)


def pack_gptq_cpu(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor, bits: int, act_pieces: int = 1) -> PackedGPTQ:
    """A GPTQ layer's checkpoint tensors (layout in :mod:`optgptq_kernels.gptq`) -> the native
    kernel's layout, its products to run with ``act_pieces`` INT8 pieces per activation;
    ``ValueError`` on a ``g_idx`` naming groups the scales do not have."""
    check_bits(bits)
    k, n = g_idx.shape[0], scales.shape[1]
    return _pack_codes(unpack_rows(qweight.cpu(), bits, k).to(torch.int16),
                       unpack_cols(qzeros.cpu(), bits, n), scales, g_idx, bits, act_pieces)


def _pack_codes(codes: torch.Tensor, stored_zeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor, bits: int, act_pieces: int) -> PackedGPTQ:
    """Codes ``[K, N]`` (int16) and stored zero points ``[G, N]`` -> :class:`PackedGPTQ`."""
    if act_pieces not in (1, 2):
        raise ValueError(f"act_pieces must be 1 or 2, got {act_pieces}")
    k, n = g_idx.shape[0], scales.shape[1]
    groups = scales.shape[0]
    g = g_idx.long().cpu()
    if k == 0 or int(g.min()) < 0 or int(g.max()) >= groups:
        raise ValueError(f"g_idx must name groups in [0, {groups}) for {k} input rows")
    order = torch.argsort(g, stable=True)
    counts = torch.bincount(g, minlength=groups)
    padded = (counts + 7) // 8 * 8
    starts = torch.cumsum(padded, 0) - padded
    # packed row of each sorted input row: its group's start + its rank within the group
    ranks = torch.arange(k) - (torch.cumsum(counts, 0) - counts)[g[order]]
    rows = starts[g[order]] + ranks
    k8 = int(padded.sum())
    src = torch.full((k8,), -1, dtype=torch.int32)
    src[rows] = order.int()
    q = torch.zeros(k8, n, dtype=torch.int16)
    q[rows] = codes[order]
    bounds, owner = [0], []
    for gi in torch.nonzero(padded).flatten().tolist():
        end = int(starts[gi] + padded[gi])
        while bounds[-1] < end:
            bounds.append(min(end, bounds[-1] + SEGMENT))
            owner.append(gi)
    panels = -(-n // PANEL)

    def by_panel(t: torch.Tensor) -> torch.Tensor:  # [R, N] -> [P, R, 64], zero-padded
        t = torch.nn.functional.pad(t, (0, panels * PANEL - n))
        return t.view(t.shape[0], panels, PANEL).transpose(0, 1).contiguous()

    identity = k8 == k and torch.equal(src, torch.arange(k, dtype=torch.int32))
    return PackedGPTQ(codes=_vectors(by_panel(q), bits),
                      scales=by_panel(scales.cpu().half()),
                      zeros=by_panel(stored_zeros).to(torch.uint8),
                      seg_rows=torch.tensor(bounds, dtype=torch.int32),
                      seg_group=torch.tensor(owner, dtype=torch.int32),
                      src=None if identity else src, bits=bits, in_features=k, out_features=n,
                      act_pieces=act_pieces)


def quantize_int8_cpu(weight: torch.Tensor, group_size: int = SEGMENT) -> PackedGPTQ:
    """A float ``[N, K]`` linear weight rounded to 8-bit codes for this kernel: symmetric, one
    float16 scale per ``group_size`` inputs and output (``absmax / 127``, zero point 128), as
    llama.cpp's Q8_0 stores the output head of its 4-bit files. With one INT8 piece per
    activation the products are exact int32 sums, like the 4-bit layers'; the weight's error
    is at most half a step, ``absmax / 254`` of its group."""
    n, k = weight.shape
    groups = -(-k // group_size)
    w = torch.nn.functional.pad(weight.detach().float().cpu(), (0, groups * group_size - k))
    w = w.view(n, groups, group_size)
    scales = (w.abs().amax(dim=2) / 127).half()
    scales = torch.where(scales == 0, torch.ones((), dtype=scales.dtype), scales)  # all-zero group
    codes = (w / scales.float().unsqueeze(2)).round().clamp(-127, 127).to(torch.int16) + 128
    codes = codes.view(n, -1)[:, :k].t().to(torch.int16)                 # [K, N]
    g_idx = torch.arange(k, dtype=torch.int32) // group_size
    zeros = torch.full((groups, n), 127, dtype=torch.int16)               # stored as z - 1
    return _pack_codes(codes, zeros, scales.t().contiguous(), g_idx, 8, act_pieces=1)


def gptq_cpu_linear(x: torch.Tensor, packed: PackedGPTQ,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [rows, K] @ W (+ bias)`` through the native kernel, computed in float32 and returned
    in ``x``'s dtype (call :func:`optgptq_kernels.cpu_native.available` first)."""
    xf = x.float()
    if xf.stride(1) != 1:
        xf = xf.contiguous()
    out = cpu_native.ops().gptq_packed_linear(xf, packed.codes, packed.scales, packed.zeros,
                                              packed.seg_rows, packed.seg_group, packed.src,
                                              packed.bits, packed.out_features,
                                              None if bias is None else bias.float(),
                                              packed.act_pieces)
    return out.to(x.dtype)
