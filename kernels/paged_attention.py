"""Paged attention over the engine's block-layout KV cache (PyTorch reference).

Cache layout, one tensor for K and one for V per layer::

    [num_kv_heads, num_blocks, block_size, head_dim]

Token ``t`` of a sequence lives in block ``block_table[t // block_size]`` at slot
``t % block_size``. Head-major, so the ``[block_size, head_dim]`` tile of one block and one KV
head is contiguous: a kernel loads it in one piece and a gather is a plain ``index_select``. A step's query tokens from several sequences arrive flattened (varlen):

- ``q``               ``[num_tokens, num_heads, head_dim]``
- ``query_start_loc`` ``[num_seqs + 1]`` offsets of each sequence's query tokens in ``q``
- ``seq_lens``        ``[num_seqs]`` context length of each sequence *including* its new tokens
- ``block_tables``    ``[num_seqs, max_blocks]`` (entries past a sequence's blocks may be any valid id)

Query token ``j`` of sequence ``i`` sits at position ``seq_lens[i] - q_len_i + j`` and attends
causally to keys ``0..position``: this covers decode (one token), whole prefill, chunked prefill
and prefill after a prefix-cache hit with one rule. GQA: with ``num_heads = G * num_kv_heads``,
query head ``h`` reads KV head ``h // G``; queries are viewed as ``[num_kv_heads, G, q_len, D]``
so one batched matmul serves a whole group against its shared K/V, never repeating the cache.
ALiBi adds ``slope_h * (key_pos - query_pos)`` to the scores (no mask tensor is stored).
Scores, softmax and the weighted sum run in float32; the output has ``q``'s dtype. Cache slots
past a sequence's length get zero weight; they may hold stale values but must be finite (the
engine zero-fills its pool, and 0 * NaN would be NaN).

Decode tokens (one query token per sequence) are sorted by context length and gathered in groups
of up to ``DECODE_GROUP`` sequences padded to the group's longest, so a batch of mixed lengths
moves little padding; prefill chunks are handled one sequence at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DECODE_GROUP = 16


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_len: torch.Tensor,
    scale: float,
    alibi_slopes: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of grouped queries over gathered K/V, in float32.

    q [B, Hkv, G, n, D]; k, v [Hkv, B, L, D] (as gathered); q_pos [B, n]; k_len [B]
    -> [B, Hkv, G, n, D].
    A group's G*n query rows form one attention problem against their KV head, so K/V are never
    repeated per query head; the masked softmax runs in PyTorch's fused SDPA.
    """
    b, hkv, group, n, d = q.shape
    length = k.shape[2]
    key_pos = torch.arange(length, device=q.device).view(1, 1, -1)
    allowed = (key_pos <= q_pos.unsqueeze(-1)) & (key_pos < k_len.view(-1, 1, 1))  # [B, n, L]
    allowed = allowed.unsqueeze(1).unsqueeze(1)                                     # [B,1,1,n,L]
    if alibi_slopes is None:
        mask = allowed.expand(b, 1, group, n, length).reshape(b, 1, group * n, length)
    else:
        dist = (key_pos - q_pos.unsqueeze(-1)).float().unsqueeze(1).unsqueeze(1)
        bias = alibi_slopes.float().view(1, hkv, group, 1, 1) * dist                 # [B,Hkv,G,n,L]
        mask = bias.masked_fill(~allowed, float("-inf")).view(b, hkv, group * n, length)
    out = F.scaled_dot_product_attention(
        q.reshape(b, hkv, group * n, d).float(),
        k.transpose(0, 1).float(), v.transpose(0, 1).float(), attn_mask=mask, scale=scale)
    return out.view(b, hkv, group, n, d)


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """cache [Hkv, N, bs, D], blocks [B, nb] -> a fresh contiguous [Hkv, B, nb * bs, D] tensor."""
    b, nb = blocks.shape
    hkv, _, bs, d = cache.shape
    return torch.index_select(cache, 1, blocks.reshape(-1)).view(hkv, b, nb * bs, d)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of every query token over its sequence's cached context; returns q's shape."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[0], k_cache.shape[2]
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [starts[i + 1] - starts[i] for i in range(len(lens))]

    decode = sorted((i for i, n in enumerate(q_lens) if n == 1), key=lambda i: -lens[i])
    for g in range(0, len(decode), DECODE_GROUP):
        group_ids = decode[g:g + DECODE_GROUP]
        idx = torch.tensor(group_ids, device=q.device)
        rows = query_start_loc[idx].long()
        blocks = block_tables[idx, : (lens[group_ids[0]] + block_size - 1) // block_size].long()
        k_len = seq_lens[idx].long()
        qd = q[rows].view(len(group_ids), num_kv_heads, group, 1, head_dim)
        o = _attend(qd, _gather(k_cache, blocks), _gather(v_cache, blocks),
                    (k_len - 1).view(-1, 1), k_len, scale, alibi_slopes)
        out[rows] = o.reshape(len(group_ids), num_heads, head_dim).to(q.dtype)

    for i, n in enumerate(q_lens):
        if n <= 1:
            continue
        length = lens[i]
        blocks = block_tables[i : i + 1, : (length + block_size - 1) // block_size].long()
        qi = q[starts[i] : starts[i] + n].view(n, num_kv_heads, group, head_dim)
        qi = qi.permute(1, 2, 0, 3).unsqueeze(0)  # [1, Hkv, G, n, D]
        q_pos = torch.arange(length - n, length, device=q.device).view(1, n)
        k_len = seq_lens[i : i + 1].long()
        o = _attend(qi, _gather(k_cache, blocks), _gather(v_cache, blocks),
                    q_pos, k_len, scale, alibi_slopes)
        out[starts[i] : starts[i] + n] = o[0].permute(2, 0, 1, 3).reshape(n, num_heads, head_dim).to(q.dtype)
    return out
