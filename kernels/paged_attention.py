"""Paged attention over the engine's block-layout KV cache (PyTorch reference).

Cache layout, one tensor for K and one for V per layer::

    [num_blocks, block_size, num_kv_heads, head_dim]

Token ``t`` of a sequence lives in block ``block_table[t // block_size]`` at slot
``t % block_size``. A step's query tokens from several sequences arrive flattened (varlen):

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
past a sequence's length are never trusted: their K is masked and their V zeroed.

Decode tokens (one query token per sequence) are batched in one padded gather; prefill chunks are
handled one sequence at a time.
"""

from __future__ import annotations

import torch


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_len: torch.Tensor,
    scale: float,
    alibi_slopes: torch.Tensor | None,
) -> torch.Tensor:
    """q [B, Hkv, G, n, D]; k, v [B, Hkv, L, D]; q_pos [B, n]; k_len [B] -> [B, Hkv, G, n, D]."""
    num_kv_heads, group = q.shape[1], q.shape[2]
    scores = torch.matmul(q.float(), k.float().unsqueeze(2).transpose(-1, -2)) * scale
    key_pos = torch.arange(k.shape[2], device=q.device)
    if alibi_slopes is not None:
        dist = (key_pos.view(1, 1, -1) - q_pos.unsqueeze(-1)).float()  # [B, n, L]
        slopes = alibi_slopes.float().view(1, num_kv_heads, group, 1, 1)
        scores = scores + slopes * dist.unsqueeze(1).unsqueeze(1)
    masked = (key_pos.view(1, 1, -1) > q_pos.unsqueeze(-1)) | (
        key_pos.view(1, 1, -1) >= k_len.view(-1, 1, 1)
    )
    scores = scores.masked_fill(masked.unsqueeze(1).unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Slots past a sequence's length may hold anything (even NaN): zero them, as 0 * NaN = NaN.
    beyond = (key_pos.view(1, -1) >= k_len.view(-1, 1)).view(k.shape[0], 1, -1, 1)
    return torch.matmul(probs, v.float().masked_fill(beyond, 0.0).unsqueeze(2))


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """cache [N, bs, Hkv, D], blocks [B, nb] -> [B, Hkv, nb * bs, D]."""
    b, nb = blocks.shape
    _, bs, hkv, d = cache.shape
    return cache[blocks].view(b, nb * bs, hkv, d).permute(0, 2, 1, 3)


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
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [starts[i + 1] - starts[i] for i in range(len(lens))]

    decode = [i for i, n in enumerate(q_lens) if n == 1]
    if decode:
        idx = torch.tensor(decode, device=q.device)
        rows = torch.tensor([starts[i] for i in decode], device=q.device)
        max_len = max(lens[i] for i in decode)
        blocks = block_tables[idx, : (max_len + block_size - 1) // block_size].long()
        k_len = seq_lens[idx].long()
        qd = q[rows].view(len(decode), num_kv_heads, group, 1, head_dim)
        o = _attend(qd, _gather(k_cache, blocks), _gather(v_cache, blocks),
                    (k_len - 1).view(-1, 1), k_len, scale, alibi_slopes)
        out[rows] = o.view(len(decode), num_heads, head_dim).to(q.dtype)

    for i, n in enumerate(q_lens):
        if n <= 1:
            continue
        length = lens[i]
        blocks = block_tables[i : i + 1, : (length + block_size - 1) // block_size].long()
        qi = q[starts[i] : starts[i] + n].view(n, num_kv_heads, group, head_dim)
        qi = qi.permute(1, 2, 0, 3).unsqueeze(0)
        q_pos = torch.arange(length - n, length, device=q.device).view(1, n)
        k_len = seq_lens[i : i + 1].long()
        o = _attend(qi, _gather(k_cache, blocks), _gather(v_cache, blocks),
                    q_pos, k_len, scale, alibi_slopes)
        out[starts[i] : starts[i] + n] = o[0].permute(2, 0, 1, 3).reshape(n, num_heads, head_dim)
    return out
