"""Paged attention in Triton: decode, chunked prefill and prefix hits in one varlen kernel.

Same contract as :func:`optgptq_kernels.paged_attention.paged_attention_ref` (cache layout
``[num_kv_heads, num_blocks, block_size, head_dim]``, flat varlen queries, causal, GQA, ALiBi).

Grid ``(num_seqs, q_tiles * num_parts, num_kv_heads)``. A program owns one KV head, a tile of
``BLOCK_Q`` query tokens of one sequence and one partition of its keys. Its ``BLOCK_M`` rows are
the tile's tokens x the ``G`` query heads of the KV head's group (row ``r``: token ``r // G_PAD``,
head ``r % G_PAD``), so each K/V tile is loaded once and serves the whole group through one
``tl.dot`` (GQA sharing). Keys stream in tiles of ``BLOCK_N`` tokens gathered through the block
table (each block's ``[block_size, head_dim]`` slab is contiguous); an online softmax keeps the
running max and sum in float32 (base 2). ALiBi adds ``slope * (key_pos - query_pos)``, computed
from positions; no bias or mask tensor exists.

Decode (every query chunk one token): ``BLOCK_Q = 1``, ``BLOCK_M = max(16, G_PAD)``. When the
batch alone would not fill the GPU and contexts may be long, keys are split into as many
partitions as it takes to fill it (flash-decoding): ``num_parts`` is fixed by the launch from
``max_seq_len`` (``MIN_PARTITION`` keys each at that length), and each sequence divides its own
keys into ``num_parts`` equal runs of whole ``BLOCK_N`` tiles, so a CUDA graph captured for the
longest context still spreads a short one over the GPU (partitions past its end have no keys).
Each writes an unnormalised partial output with its max and sum, and a second kernel reduces a
sequence's partitions, ``BLOCK_P`` at a time. Prefill and mixed batches use ``BLOCK_M = 64`` rows
and one partition: a long prompt already has many query tiles.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MIN_PARTITION = 256
BLOCK_N = 64
BLOCK_P = 16


@triton.jit
def _attn_kernel(q_ptr, k_cache, v_cache, out_ptr, block_tables, seq_lens, query_start_loc,
                 alibi_ptr, part_out, part_m, part_l, scale_log2,
                 stride_qt, stride_qh, stride_ot, stride_oh,
                 stride_ch, stride_cb, stride_cs, stride_bt,
                 stride_mt, stride_mh, num_parts, head_dim, group,
                 KV_BLOCK: tl.constexpr, HAS_ALIBI: tl.constexpr, SPLIT: tl.constexpr,
                 BLOCK_Q: tl.constexpr, G_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                 IEEE: tl.constexpr):
    seq = tl.program_id(0)
    qtile = tl.program_id(1) // num_parts
    part = tl.program_id(1) % num_parts
    kvh = tl.program_id(2)
    q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    if qtile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens + seq)
    ctx = seq_len - q_len                                  # position of the first query token

    rows = tl.arange(0, BLOCK_M)
    tok = qtile * BLOCK_Q + rows // G_PAD
    hg = rows % G_PAD
    valid = (rows < BLOCK_Q * G_PAD) & (tok < q_len) & (hg < group)
    head = kvh * group + hg
    d = tl.arange(0, D_PAD)
    dm = d < head_dim
    q = tl.load(q_ptr + (q_start + tok).to(tl.int64)[:, None] * stride_qt
                + head[:, None] * stride_qh + d[None, :],
                mask=valid[:, None] & dm[None, :], other=0.0)
    q_pos = ctx + tok
    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + head, mask=valid, other=0.0).to(tl.float32) * 1.4426950408889634

    last = tl.minimum(qtile * BLOCK_Q + BLOCK_Q, q_len) - 1
    kv_end = ctx + last + 1
    if SPLIT:
        part_size = _part_size(kv_end, num_parts, BLOCK_N)
        lo = part * part_size                       # past the end: an empty loop
        hi = tl.minimum(kv_end, lo + part_size)
    else:
        lo = 0
        hi = kv_end
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    cache_head = kvh.to(tl.int64) * stride_ch
    for start in range(lo, hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        kmask = kpos < hi
        blk = tl.load(block_tables + seq * stride_bt + kpos // KV_BLOCK, mask=kmask, other=0)
        off = cache_head + blk.to(tl.int64) * stride_cb + (kpos % KV_BLOCK) * stride_cs
        kv_mask = kmask[:, None] & dm[None, :]
        k = tl.load(k_cache + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2
        if HAS_ALIBI:
            s += slope[:, None] * (kpos[None, :] - q_pos[:, None]).to(tl.float32)
        s = tl.where((kpos[None, :] <= q_pos[:, None]) & kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    t64 = (q_start + tok).to(tl.int64)
    if SPLIT:
        ml = t64 * stride_mt + head * stride_mh + part              # [T, H, P] partial max/sum
        tl.store(part_m + ml, m_i, mask=valid)
        tl.store(part_l + ml, l_i, mask=valid)
        tl.store(part_out + (ml * D_PAD)[:, None] + d[None, :], acc,
                 mask=valid[:, None] & dm[None, :])
    else:
        out = acc / l_i[:, None]
        tl.store(out_ptr + t64[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=valid[:, None] & dm[None, :])


@triton.jit
def _part_size(seq_len, num_parts, BLOCK_N: tl.constexpr):
    """Keys per partition of a sequence: its ``num_parts``-th share, in whole ``BLOCK_N`` tiles."""
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_parts), BLOCK_N), 1) * BLOCK_N


@triton.jit
def _reduce_kernel(part_out, part_m, part_l, out_ptr, seq_lens, stride_ot, stride_oh, num_parts,
                   num_heads, head_dim, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    """Combines the partitions of one (token, head) of a decode batch (token ``t`` is sequence
    ``t``) in one pass, ``BLOCK_P`` partitions per load: each partial rescaled by its max."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens + t)
    active = tl.cdiv(seq_len, _part_size(seq_len, num_parts, BLOCK_N))
    base = (t * num_heads + h) * num_parts
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, D_PAD)
    m_all = float("-inf")
    total = 0.0
    acc = tl.zeros([D_PAD], tl.float32)
    for p0 in range(0, active, BLOCK_P):  # one pass, rescaled as the max grows
        live = p0 + p < active
        m = tl.load(part_m + base + p0 + p, mask=live, other=float("-inf"))
        m_new = tl.maximum(m_all, tl.max(m, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.math.exp2(m_all - m_safe)
        w = tl.where(m == float("-inf"), 0.0, tl.math.exp2(m - m_safe))
        l_part = tl.load(part_l + base + p0 + p, mask=live, other=0.0)
        total = total * rescale + tl.sum(l_part * w, 0)
        part = tl.load(part_out + ((base + p0 + p) * D_PAD)[:, None] + d[None, :],
                       mask=live[:, None], other=0.0)
        acc = acc * rescale + tl.sum(part * w[:, None], 0)
        m_all = m_new
    out = tl.where(total > 0, acc / total, 0.0)   # a padding slot (no keys) gets zeros
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < head_dim)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _parallelism(device: torch.device) -> int:
    """Programs that keep the device busy; a fixed guess where there is no GPU (interpreter)."""
    return 2 * _num_sms(device.index or 0) if device.type == "cuda" else 64


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           query_start_loc: torch.Tensor, scale: float,
                           alibi_slopes: torch.Tensor | None, max_query_len: int,
                           max_seq_len: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of every query token over its sequence's cached context, written to ``out``
    (allocated when None) of q's shape and dtype."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, kv_block, _ = k_cache.shape
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(q) if out is None else out
    if num_tokens == 0:
        return out
    g_pad = triton.next_power_of_2(group)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    if max_query_len == 1:
        block_q, block_m = 1, max(16, g_pad)
        work = num_seqs * num_kv_heads
        num_parts = 1
        target = _parallelism(q.device)
        if work < target and max_seq_len > MIN_PARTITION:
            num_parts = min(triton.cdiv(target, work), triton.cdiv(max_seq_len, MIN_PARTITION))
    else:
        block_m = max(64, g_pad)
        block_q, num_parts = block_m // g_pad, 1
    q_tiles = triton.cdiv(max_query_len, block_q)
    split = num_parts > 1
    if split:
        part_out = torch.empty((num_tokens, num_heads, num_parts, d_pad), dtype=torch.float32,
                               device=q.device)
        part_m = torch.empty((num_tokens, num_heads, num_parts), dtype=torch.float32,
                             device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part_out = part_m = part_l = out  # unused
    _attn_kernel[(num_seqs, q_tiles * num_parts, num_kv_heads)](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        alibi_slopes if alibi_slopes is not None else q, part_out, part_m, part_l,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        num_heads * num_parts, num_parts, num_parts, head_dim, group,
        KV_BLOCK=kv_block, HAS_ALIBI=alibi_slopes is not None, SPLIT=split,
        BLOCK_Q=block_q, G_PAD=g_pad, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        D_PAD=d_pad, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2)
    if split:
        _reduce_kernel[(num_tokens, num_heads)](
            part_out, part_m, part_l, out, seq_lens, out.stride(0), out.stride(1), num_parts,
            num_heads, head_dim, D_PAD=d_pad, BLOCK_N=BLOCK_N, BLOCK_P=BLOCK_P)
    return out
