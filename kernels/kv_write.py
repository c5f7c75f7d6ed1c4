"""KV cache write: scatter a step's new K/V rows into their cache slots (PyTorch reference).

``slot_mapping[t] = block_id * block_size + offset`` is the flat slot of token ``t``; the caches
have the layout ``[num_kv_heads, num_blocks, block_size, head_dim]`` and are written in place.
A negative slot marks a padding token, which is skipped.
"""

from __future__ import annotations

import torch


def write_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v [num_tokens, num_kv_heads, head_dim] -> caches at ``slot_mapping`` (int64)."""
    num_kv_heads, head_dim = k_cache.shape[0], k_cache.shape[3]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    for cache, new in ((k_cache, k), (v_cache, v)):
        flat = cache.view(num_kv_heads, -1, head_dim)
        flat.index_copy_(1, slot_mapping, new.transpose(0, 1).to(cache.dtype))
