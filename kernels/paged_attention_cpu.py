"""Paged attention on the CPU: decode tokens through a native kernel that reads the cache's
blocks in place, prefill chunks through the reference's matrix products.

The PyTorch reference (:mod:`optgptq_kernels.paged_attention`) gathers each sequence's blocks
into a contiguous copy and runs SDPA over it: the KV bytes cross memory three times (read,
write, read again). A decode token does two flops per KV byte, so on a CPU serving many
sequences that traffic is most of the decode step. The native kernel
(``paged_attention_cpu.cpp``, float32) walks the block table instead and reads every key and
value row of a decoding sequence once, where it lies, for the whole GQA group. A prefill chunk
does many flops per KV byte: there SDPA's matrix products win (on 512-1000-token chunks here the
reference ran 2.4-3.6x faster than per-row dot products). A chunk that is its sequence's whole
context (a prompt prefilled in one step, no cached prefix) is plain causal attention: its keys
are gathered and SDPA runs with ``is_causal`` (GQA heads shared, not repeated), which skips the
masked half of the scores (2x faster than an explicit mask on 1000-token prompts). Other chunks
(after a prefix, a later piece of a long prompt, ALiBi) go to the reference, batched on their
own.

The kernel is part of the native CPU extension (:mod:`optgptq_kernels.cpu_native`: built on
first use with the machine's instruction set); where it cannot be built the dispatch point falls
back to the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from optgptq_kernels import cpu_native
from optgptq_kernels.paged_attention import paged_attention_ref


def paged_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor,
                        query_start_loc: torch.Tensor, scale: float,
                        alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of every query token over its sequence's cached context; returns q's shape."""
    out = cpu_native.ops().paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                                  query_start_loc, scale, alibi_slopes)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    chunks = torch.nonzero(q_lens > 1)[:, 0]
    if chunks.numel() and alibi_slopes is None:
        whole = q_lens[chunks] == seq_lens[chunks]
        for i, start, n in zip(chunks[whole].tolist(), query_start_loc[chunks[whole]].tolist(),
                               q_lens[chunks[whole]].tolist()):
            out[start:start + n] = _causal(q[start:start + n], k_cache, v_cache,
                                           block_tables[i], scale)
        chunks = chunks[~whole]
    if chunks.numel():
        lens = q_lens[chunks]
        rows = torch.cat([torch.arange(s, s + n) for s, n in
                          zip(query_start_loc[chunks].tolist(), lens.tolist())])
        out[rows] = paged_attention_ref(q[rows], k_cache, v_cache, block_tables[chunks],
                                        seq_lens[chunks], F.pad(lens.cumsum(0), (1, 0)).int(),
                                        scale, alibi_slopes)
    return out


def _causal(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            block_table: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of a sequence's whole context, q [n, H, D] -> [n, H, D]."""
    n, _, d = q.shape
    block_size = k_cache.shape[2]
    blocks = block_table[:-(-n // block_size)].long()
    k, v = (torch.index_select(cache, 1, blocks).flatten(1, 2)[:, :n] for cache in (k_cache, v_cache))
    out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0),
                                         v.unsqueeze(0), is_causal=True, scale=scale,
                                         enable_gqa=True)
    return out[0].transpose(0, 1)
