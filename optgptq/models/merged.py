"""Projections that read the same input, run as one matrix product.

A Llama layer reads its normed hidden state three times (q, k and v) and its post-attention
state twice (gate and up). At small batch each product is a pass over its weight plus a
launch; k and v of a GQA model are narrow (``Hkv * D`` outputs), too few columns to keep an
accelerator busy. Concatenating the weights along the output dimension makes one wider
product whose output is split into views, as vLLM's merged linears do.

Checkpoints keep the separate names (``q_proj``, ``k_proj``, ...), so models load them as
separate linears and merge after loading (:meth:`MergedProjections.merge`). Layers merge when
they are all ``nn.Linear`` (weights and biases concatenated) or all of a quantized kind whose
layer class defines ``concat(layers)`` (GPTQ: codes, zeros and scales side by side, when the
layers share their input-group layout); anything else stays separate and runs one by one.
"""

from __future__ import annotations

import torch
from torch import nn


def concat_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One layer whose output is the concatenation of ``layers``' outputs, or None when these
    layers cannot be concatenated (mixed kinds, some with a bias and some without, or a kind
    that defines no ``concat``)."""
    kind = type(layers[0])
    has_bias = [getattr(layer, "bias", None) is not None for layer in layers]
    if any(type(layer) is not kind for layer in layers) or len(set(has_bias)) > 1:
        return None
    if kind is nn.Linear:
        merged = nn.Linear(layers[0].in_features, sum(layer.out_features for layer in layers),
                           bias=has_bias[0], device="meta")
        merged.weight = nn.Parameter(torch.cat([layer.weight for layer in layers]),
                                     requires_grad=False)
        if has_bias[0]:
            merged.bias = nn.Parameter(torch.cat([layer.bias for layer in layers]),
                                       requires_grad=False)
        return merged
    concat = getattr(kind, "concat", None)
    return concat(layers) if concat is not None else None


class MergedProjections(nn.Module):
    """Linears over one input; ``forward`` returns their outputs as a tuple, from one product
    once merged (views of its output) or from each layer in turn."""

    def __init__(self, owner: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.owner_names = names
        self.sizes: list[int] = []
        self.merged: nn.Module | None = None
        self._owner = [owner]  # not a submodule: the owner keeps the separate layers until merged

    def merge(self) -> None:
        """Concatenate the owner's layers (once their weights are loaded); a set that cannot be
        concatenated is left as is; merged ones stay merged."""
        if self.merged is not None:
            return
        owner = self._owner[0]
        layers = [getattr(owner, name) for name in self.owner_names]
        merged = concat_linears(layers)
        if merged is None:
            return
        self.sizes = [layer.out_features for layer in layers]
        self.merged = merged
        for name in self.owner_names:
            delattr(owner, name)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.merged is not None:
            return self.merged(x).split(self.sizes, dim=-1)
        owner = self._owner[0]
        return tuple(getattr(owner, name)(x) for name in self.owner_names)


@torch.no_grad()
def merge_projections(model: nn.Module) -> None:
    """Merge every :class:`MergedProjections` of ``model`` (called once its weights are
    loaded)."""
    for module in list(model.modules()):
        if isinstance(module, MergedProjections):
            module.merge()
