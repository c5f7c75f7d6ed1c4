"""Paged attention on the CPU: decode tokens and prefill chunks through native kernels that read
the cache's blocks in place.

The PyTorch reference (:mod:`optgptq_kernels.paged_attention`) gathers each sequence's blocks
into a contiguous copy and runs SDPA over it: the KV bytes cross memory three times (read,
write, read again). A decode token does two flops per KV byte, so on a CPU serving many
sequences that traffic is most of the decode step. The decode kernel
(``paged_attention_cpu.cpp``, float32) walks the block table instead and reads every key and
value row of a decoding sequence once, where it lies, for the whole GQA group.

A prefill chunk does many flops per KV byte. The prefill kernel (``prefill_attention_cpu.cpp``,
AVX-512 builds) gathers each chunk's keys and values once into panels and runs both products
through the packed-product register tile, in tiles of 16 tokens that stop at their last token
(causal): whole prompts, pieces of long ones, chunks after a cached prefix and ALiBi alike. On a
mixed step of SmolLM2's shapes (prompts of 512, 300 and 150 tokens and a 62-token piece after
338 cached ones, 9 query and 3 KV heads) it ran 2.5x the path it replaced, per-sequence SDPA
with ``is_causal`` for whole prompts and the reference's masked SDPA for the rest (9.6 -> 3.8
ms per layer). That path remains where the prefill kernel is not compiled.

The kernels are part of the native CPU extension (:mod:`optgptq_kernels.cpu_native`: built on
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
    native = cpu_native.ops()
    out = native.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                        query_start_loc, scale, alibi_slopes)
    if native.avx512_built():  # the prefill kernel exists
        native.paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                       query_start_loc, scale, alibi_slopes, out)
        return out
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
