"""Merged projections (q/k/v and gate/up as one product): the same outputs as the separate
layers, which layers merge, and that the engine's models run merged after loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optgptq.engine.llm import LLM
from optgptq.models.dgq_linear import DGQConfig, DGQLinear
from optgptq.models.merged import MergedProjections, concat_linears
from optgptq.models.quant_linear import GPTQConfig, GPTQLinear


class Owner(nn.Module):
    def __init__(self, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, layer in layers.items():
            setattr(self, name, layer)
        self.proj = MergedProjections(self, list(layers))


def _gptq(k: int, n: int, g: torch.Generator, bias: bool = False, group: int = 32) -> GPTQLinear:
    layer = GPTQLinear(k, n, GPTQConfig(4, group), bias)
    for name, t in layer.random_tensors(g).items():
        setattr(layer, name, t)
    if bias:
        layer.bias = nn.Parameter(torch.randn(n, generator=g), requires_grad=False)
    return layer


def test_float_linears_merge_into_one_product_with_the_same_outputs():
    g = torch.Generator().manual_seed(0)
    layers = {}
    for name, n in (("q", 48), ("k", 16), ("v", 16)):
        layer = nn.Linear(32, n)
        with torch.no_grad():
            layer.weight.normal_(generator=g)
            layer.bias.normal_(generator=g)
        layers[name] = layer
    owner = Owner(layers)
    x = torch.randn(5, 32, generator=g)
    expect = [layer(x) for layer in layers.values()]
    owner.proj.merge()
    owner.proj.merge()                                                    # idempotent
    assert owner.proj.merged is not None and not hasattr(owner, "q")
    got = owner.proj(x)
    assert [t.shape for t in got] == [t.shape for t in expect]
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_gptq_linears_merge_codes_zeros_and_scales_side_by_side(bias):
    g = torch.Generator().manual_seed(1)
    layers = {"gate": _gptq(64, 96, g, bias), "up": _gptq(64, 96, g, bias)}
    owner = Owner(layers)
    x = torch.randn(3, 64, generator=g)
    expect = [layer(x) for layer in layers.values()]
    owner.proj.merge()
    merged = owner.proj.merged
    assert isinstance(merged, GPTQLinear) and merged.out_features == 192
    assert merged.qweight.shape == (8, 192) and merged.qzeros.shape == (2, 24)
    for a, b in zip(owner.proj(x), expect):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_layers_that_cannot_merge_stay_separate_and_still_run():
    g = torch.Generator().manual_seed(2)
    act_order = _gptq(64, 32, g)
    act_order.g_idx = act_order.g_idx[torch.randperm(64, generator=g)]  # another group layout
    plain = _gptq(64, 32, g)
    assert concat_linears([plain, act_order]) is None
    assert concat_linears([plain, nn.Linear(64, 32)]) is None            # mixed kinds
    assert concat_linears([nn.Linear(64, 8), nn.Linear(64, 8, bias=False)]) is None
    dgq = DGQLinear(64, 32, DGQConfig(32), False)                      # no concat defined
    assert concat_linears([dgq, dgq]) is None
    owner = Owner({"a": plain, "b": act_order})
    x = torch.randn(2, 64, generator=g)
    expect = (plain(x), act_order(x))
    owner.proj.merge()
    assert owner.proj.merged is None and hasattr(owner, "a")
    for a, b in zip(owner.proj(x), expect):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mha"])
def test_engine_models_run_merged_after_loading(tiny_models, name):
    llm = LLM(str(tiny_models[name]), device="cpu", num_blocks=16)
    merged = [m for m in llm.engine.runner.model.modules() if isinstance(m, MergedProjections)]
    assert merged and all(m.merged is not None for m in merged)
    names = {n.rpartition(".")[2] for n, _ in llm.engine.runner.model.named_modules()}
    assert not names & {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
