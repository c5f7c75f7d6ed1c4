"""The BLOOM family (ALiBi position bias, fused QKV, LayerNorm, GELU) over the paged KV cache.

Parameter names mirror transformers' BloomForCausalLM. BLOOM's fused ``query_key_value``
projection is laid out per head as ``[num_heads, 3, head_dim]``; ALiBi slopes are handed to the
attention kernel, which adds ``slope * (key_pos - query_pos)`` (softmax-equivalent to BLOOM's
``slope * key_pos``) without any stored bias tensor.

Grouped-query BLOOM (from ``optgptq convert``): transformers' BLOOM has no K/V head count, so a
converted checkpoint keeps the multi-head layout with every head of a group holding the group's
merged K/V, and config.json lists the groups per layer in ``kv_head_groups``. Here each layer
then reads its query heads in group order (slopes travel with their heads), takes one K/V head
per group from the first head of the group, and caches only those: the KV saving is real.
"""

from __future__ import annotations

import torch
from torch import nn

from optgptq.models.layers import AttentionMetadata, PagedAttention, alibi_slopes


def _bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def _kv_groups(config, layer: int) -> list[list[int]] | None:
    """The K/V head groups of ``layer`` from a converted checkpoint, checked; None for MHA."""
    groups = getattr(config, "kv_head_groups", None)
    if groups is None:
        return None
    heads = config.n_head
    if len(groups) != config.n_layer:
        raise ValueError(f"kv_head_groups lists {len(groups)} layers, the model has "
                         f"{config.n_layer}")
    layer_groups = [list(map(int, g)) for g in groups[layer]]
    flat = sorted(h for g in layer_groups for h in g)
    if flat != list(range(heads)) or len({len(g) for g in layer_groups}) != 1:
        raise ValueError(f"kv_head_groups[{layer}] must split the {heads} heads into equal "
                         f"groups, got {groups[layer]}")
    return layer_groups


class BloomAttention(nn.Module):
    def __init__(self, config, layer: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.n_head
        self.head_dim = hidden // self.num_heads
        self.query_key_value = nn.Linear(hidden, 3 * hidden, bias=True)
        self.dense = nn.Linear(hidden, hidden, bias=True)
        groups = _kv_groups(config, layer)
        slopes = alibi_slopes(self.num_heads)
        self.grouped = groups is not None
        num_kv = len(groups) if groups else self.num_heads
        if groups:
            with torch.device("cpu"):
                order = torch.tensor([h for g in groups for h in g])
                self.register_buffer("q_order", order, persistent=False)
                self.register_buffer("kv_heads", torch.tensor([g[0] for g in groups]),
                                     persistent=False)
                self.register_buffer("out_order", torch.argsort(order), persistent=False)
            slopes = slopes[order]
        self.attn = PagedAttention(self.num_heads, num_kv, self.head_dim,
                                   self.head_dim ** -0.5, slopes)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.query_key_value(x).view(t, self.num_heads, 3, self.head_dim)
        if not self.grouped:
            q, k, v = (qkv[:, :, i].reshape(t, -1) for i in range(3))
            return self.dense(self.attn(q, k, v, meta))
        q = qkv[:, self.q_order, 0].reshape(t, -1)
        k = qkv[:, self.kv_heads, 1].reshape(t, -1)
        v = qkv[:, self.kv_heads, 2].reshape(t, -1)
        out = self.attn(q, k, v, meta).view(t, self.num_heads, self.head_dim)
        return self.dense(out[:, self.out_order].reshape(t, -1))


class BloomMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(_bloom_gelu(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    def __init__(self, config, layer: int) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.self_attention = BloomAttention(config, layer)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = BloomMLP(config)
        self.post_ln_residual = config.apply_residual_connection_post_layernorm

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        ln = self.input_layernorm(x)
        x = (ln if self.post_ln_residual else x) + self.self_attention(ln, meta)
        ln = self.post_attention_layernorm(x)
        return (ln if self.post_ln_residual else x) + self.mlp(ln)


class BloomModel(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(config.hidden_size,
                                                      eps=config.layer_norm_epsilon)
        self.h = nn.ModuleList(BloomBlock(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        for block in self.h:
            x = block(x, meta)
        return self.ln_f(x)


class BloomForCausalLM(nn.Module):
    """Flat-batch BLOOM: ``forward`` gives hidden states, ``compute_logits`` the float32 logits."""

    def __init__(self, config, max_positions: int) -> None:
        super().__init__()
        self.transformer = BloomModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.transformer(input_ids, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
