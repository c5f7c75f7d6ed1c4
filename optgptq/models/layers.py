"""Building blocks shared by the model families: batch metadata, paged attention, RMSNorm, RoPE, ALiBi.

Every model runs on a *flat* batch: the step's tokens from all sequences concatenated,
``[num_tokens, hidden]``, described by :class:`AttentionMetadata`. Attention layers write their
new K/V into the paged cache bound to them by the model runner, then read the cache through
:mod:`optgptq_kernels.ops` (the one dispatch point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from optgptq_kernels import ops


@dataclass
class AttentionMetadata:
    """Where a flat batch's tokens sit in their sequences and in the paged cache."""

    positions: torch.Tensor        # [num_tokens] int64, position of each token in its sequence
    slot_mapping: torch.Tensor     # [num_tokens] int64, flat cache slot block_id * block_size + offset
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, offsets of each sequence's tokens
    seq_lens: torch.Tensor         # [num_seqs] int32, context length after this step
    block_tables: torch.Tensor     # [num_seqs, max_blocks] int32
    max_query_len: int             # longest query chunk of the step (host-side)
    max_seq_len: int               # longest context of the step (host-side)


class PagedAttention(nn.Module):
    """Writes a layer's new K/V into its cache blocks and attends over the cached context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 alibi_slopes: torch.Tensor | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of "
                             f"num_key_value_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        self.k_cache = torch.empty(0)  # bound by the model runner
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H*D], k/v [T, Hkv*D] -> [T, H*D]."""
        t = q.shape[0]
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        ops.write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = ops.paged_attention(q.view(t, self.num_heads, self.head_dim), self.k_cache,
                                  self.v_cache, meta.block_tables, meta.seq_lens,
                                  meta.query_start_loc, self.scale, self.alibi_slopes,
                                  meta.max_query_len, meta.max_seq_len)
        return out.view(t, self.num_heads * self.head_dim)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as Llama defines it; given the residual
    stream, it first adds the layer's output to it (one kernel on an accelerator) and returns
    the new stream too."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)``; ``(norm(x), x)`` without a residual."""
        return ops.add_rms_norm(x, self.weight, self.eps, residual)


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class RotaryEmbedding(nn.Module):
    """RoPE with a precomputed cos/sin table over ``max_positions`` (rotate-half convention).

    Inverse frequencies come from transformers' own rope functions, so every static scaling
    type it defines for Llama (linear, llama3, yarn) gives the frequencies transformers uses.
    """

    def __init__(self, config, head_dim: int, max_positions: int) -> None:
        super().__init__()
        params = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_parameters.rope_type={rope_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        with torch.device("cpu"):  # computed even when the model is built on the meta device
            if rope_type == "default":
                theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
                exps = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
                inv_freq, scaling = 1.0 / (theta ** exps), 1.0
            else:
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
            positions = torch.arange(max_positions, dtype=torch.float)
            emb = torch.cat([positions.unsqueeze(1) * inv_freq.float()] * 2, dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotates q [T, H*D] and k [T, Hkv*D] by their tokens' positions."""
        return ops.rotary(positions, q, k, self.cos, self.sin, num_heads, num_kv_heads)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's geometric head slopes (Press et al.), extended for head counts not a power of 2.

    Computed in float32 powers, as BLOOM's reference implementation does, on the CPU (the
    model moves it to its device).
    """
    with torch.device("cpu"):
        closest = 2 ** math.floor(math.log2(num_heads))
        base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
        slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
        if closest != num_heads:
            extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
            remaining = min(closest, num_heads - closest)
            powers = torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32)
            slopes = torch.cat([slopes, torch.pow(extra, powers)])
    return slopes
