"""Per-architecture access to a transformers model's attention weights, head by head.

The architectures and where their pieces sit are the rows of
:data:`optgptq.models.architectures.ARCHITECTURES`; this module reads and writes heads by the
row's ``family``.

The conversion works on per-query-head weight stacks ``[H, in + 1, head_dim]`` (the last input
row is the bias, zero where the projection has none) and writes merged K/V heads back:

- Llama family (``LlamaForCausalLM``, ``MistralForCausalLM``; separate q/k/v/o projections,
  RoPE): query head ``h`` reads K/V head ``h // (H / H_kv)``. Writing ``H_kv'`` groups permutes
  the query heads (``q_proj`` rows, ``o_proj`` columns) so that each group is contiguous and
  replaces ``k_proj``/``v_proj`` by ``H_kv'`` heads. RoPE uses one frequency table for all
  heads, so permuting heads keeps the model exact.
- BLOOM (``BloomForCausalLM``; fused ``query_key_value`` laid out per head as
  ``[H, 3 (q, k, v), head_dim]``, ALiBi): transformers' BLOOM has no ``num_key_value_heads``
  and computes the ALiBi slope of head ``h`` from ``h`` alone, so heads are never permuted;
  instead every query head's k/v rows are overwritten with its group's merged K/V head. The
  result keeps BLOOM's multi-head layout (loadable by transformers and this project's engine,
  each head keeping its own slope) and computes exactly the grouped-query model; the config
  records ``num_key_value_heads`` and ``kv_head_groups`` for an engine that stores one K/V
  head per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from optgptq.models.architectures import Architecture, architecture_of


def _stack(weight: torch.Tensor, bias: torch.Tensor | None, heads: int) -> torch.Tensor:
    """``nn.Linear`` weight ``[heads*D, in]`` (+ bias) -> ``[heads, in + 1, D]``."""
    out, inp = weight.shape
    w = weight.detach().float().view(heads, out // heads, inp).transpose(1, 2)
    b = (bias.detach().float() if bias is not None else weight.new_zeros(out).float())
    return torch.cat([w, b.view(heads, 1, -1)], dim=1)


def _unstack(stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[heads, in + 1, D]`` -> (weight ``[heads*D, in]``, bias ``[heads*D]``)."""
    heads, _, d = stack.shape
    return stack[:, :-1].transpose(1, 2).reshape(heads * d, -1), stack[:, -1].reshape(-1)


@dataclass
class Attention:
    """One layer's attention heads as stacks; ``write`` puts merged K/V heads back."""

    module: nn.Module
    family: str
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def input_module(self) -> nn.Linear:
        """The projection whose input is the attention input ``X``."""
        return self.module.q_proj if self.family == "llama" else self.module.query_key_value

    @property
    def out_proj(self) -> nn.Linear:
        """The output projection; its input is the concatenated per-head attention outputs."""
        return self.module.o_proj if self.family == "llama" else self.module.dense

    def stacks(self) -> dict[str, torch.Tensor]:
        """Per-query-head ``q``, ``k``, ``v`` stacks ``[H, in + 1, D]``."""
        h, d = self.num_heads, self.head_dim
        if self.family == "llama":
            m = self.module
            k = _stack(m.k_proj.weight, m.k_proj.bias, self.num_kv_heads)
            v = _stack(m.v_proj.weight, m.v_proj.bias, self.num_kv_heads)
            owner = torch.arange(h) // (h // self.num_kv_heads)
            return {"q": _stack(m.q_proj.weight, m.q_proj.bias, h), "k": k[owner], "v": v[owner]}
        qkv = self.module.query_key_value
        w = qkv.weight.detach().view(h, 3, d, -1)
        b = qkv.bias.detach().view(h, 3, d)
        return {name: _stack(w[:, i].reshape(h * d, -1), b[:, i].reshape(-1), h)
                for i, name in enumerate("qkv")}

    def write(self, groups: list[list[int]], k: torch.Tensor, v: torch.Tensor) -> None:
        """Install merged K/V heads ``k``, ``v`` ``[len(groups), in + 1, D]``, one per group."""
        if self.family == "llama":
            self._write_llama(groups, k, v)
        else:
            self._write_bloom(groups, k, v)
        self.num_kv_heads = len(groups)

    def _write_llama(self, groups: list[list[int]], k: torch.Tensor, v: torch.Tensor) -> None:
        m, h, d = self.module, self.num_heads, self.head_dim
        perm = torch.tensor([x for grp in groups for x in grp])
        with torch.no_grad():
            rows = (perm[:, None] * d + torch.arange(d)).reshape(-1)
            m.q_proj.weight.copy_(m.q_proj.weight[rows])
            if m.q_proj.bias is not None:
                m.q_proj.bias.copy_(m.q_proj.bias[rows])
            m.o_proj.weight.copy_(m.o_proj.weight[:, rows])
        for name, stack in (("k_proj", k), ("v_proj", v)):
            old = getattr(m, name)
            weight, bias = _unstack(stack)
            new = nn.Linear(old.in_features, weight.shape[0], bias=old.bias is not None,
                            dtype=old.weight.dtype, device=old.weight.device)
            with torch.no_grad():
                new.weight.copy_(weight)
                if new.bias is not None:
                    new.bias.copy_(bias)
            new.requires_grad_(False)
            setattr(m, name, new)
        m.num_key_value_groups = h // len(groups)

    def _write_bloom(self, groups: list[list[int]], k: torch.Tensor, v: torch.Tensor) -> None:
        h, d = self.num_heads, self.head_dim
        qkv = self.module.query_key_value
        w = qkv.weight.data.view(h, 3, d, -1)
        b = qkv.bias.data.view(h, 3, d)
        for gi, grp in enumerate(groups):
            for i, stack in ((1, k[gi]), (2, v[gi])):
                weight, bias = _unstack(stack[None])
                w[grp, i] = weight.to(w.dtype)
                b[grp, i] = bias.to(b.dtype)


def architecture(config) -> Architecture:
    """The model's architecture, checked to be one the conversion supports."""
    return architecture_of(config, " by the GQA conversion")


def num_kv_heads(config) -> int:
    """The K/V head count a config declares (BLOOM: ``num_key_value_heads`` written by the
    conversion, else one per head)."""
    return getattr(config, "num_key_value_heads", None) or num_heads(config)


def num_heads(config) -> int:
    return config.num_attention_heads if is_llama(config) else config.n_head


def is_llama(config) -> bool:
    """Whether the model is of the Llama family (RoPE, separate projections), not BLOOM."""
    return architecture(config).family == "llama"


def attention_layers(model: nn.Module) -> list[Attention]:
    """The model's attention layers, in order."""
    config = model.config
    arch = architecture(config)
    h, kv = num_heads(config), num_kv_heads(config)
    d = (getattr(config, "head_dim", None) if arch.family == "llama" else None) \
        or config.hidden_size // h
    return [Attention(layer.get_submodule(arch.attention), arch.family, h, kv, d)
            for layer in decoder_layers(model)]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(architecture(model.config).layers)


def final_norm(model: nn.Module) -> nn.Module:
    return model.get_submodule(architecture(model.config).final_norm)


def set_kv_heads(model: nn.Module, groups: list[list[list[int]]]) -> None:
    """Record the new K/V head count (and, for BLOOM, each layer's groups) in the config."""
    model.config.num_key_value_heads = len(groups[0])
    if not is_llama(model.config):
        model.config.kv_head_groups = groups
