"""CPU linears (packed or transposed weights) against ``nn.Linear``, and the swap the model
runner does."""

import pytest
import torch
from torch import nn

from optgptq.models.cpu_linear import CPUEmbedding, CPULinear, use_cpu_linears
from optgptq_kernels import ops


@pytest.mark.parametrize("packed", [True, False])
def test_cpu_linear_matches_linear(monkeypatch, packed):
    """Both layouts, one weight copy each; a non-contiguous input and 300 rows included."""
    if not packed:
        monkeypatch.setattr(ops, "pack_linear_weight", lambda weight: None)
    torch.manual_seed(0)
    for bias in (False, True):
        linear = nn.Linear(48, 80, bias=bias)
        t = CPULinear(linear)
        if packed and t.packed is None:
            pytest.skip("no native packed linear on this CPU (AVX-512 only)")
        assert (t.weight_t is None) == packed
        if not packed:
            assert t.weight_t.shape == (48, 80) and t.weight_t.is_contiguous()
        for x in (torch.randn(5, 48), torch.randn(2, 3, 48), torch.randn(1, 48),
                  torch.randn(48, 7).t(), torch.randn(300, 48)):
            torch.testing.assert_close(t(x), linear(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [True, False])
def test_use_cpu_linears_swaps_float_linears_and_ties_the_embedding(monkeypatch, packed):
    """Float32 linears are swapped, the head included; an embedding tied to the head reads the
    head's layout (rows bit for bit, no second copy); an untied embedding and a bfloat16 linear
    stay as they are."""
    if not packed:
        monkeypatch.setattr(ops, "pack_linear_weight", lambda weight: None)
    torch.manual_seed(1)
    model = nn.ModuleDict({"embed": nn.Embedding(150, 8), "other_embed": nn.Embedding(10, 8),
                           "proj": nn.Linear(8, 8), "lm_head": nn.Linear(8, 150, bias=False),
                           "bf16": nn.Linear(8, 8).to(torch.bfloat16),
                           "inner": nn.Sequential(nn.Linear(8, 4), nn.ReLU())})
    model["lm_head"].weight = model["embed"].weight
    table = model["embed"].weight.detach().clone()
    ids = torch.randint(0, 150, (3, 5))
    ids[0, 0], ids[0, 1] = 149, 64  # the ragged last panel and a panel's first column
    hidden = torch.randn(6, 8)
    want_logits = model["lm_head"](hidden)
    assert use_cpu_linears(model) == 3
    assert all(isinstance(model[n], CPULinear) for n in ("proj", "lm_head"))
    assert isinstance(model["inner"][0], CPULinear)
    assert type(model["bf16"]) is nn.Linear and type(model["other_embed"]) is nn.Embedding
    assert isinstance(model["embed"], CPUEmbedding)
    assert not model["embed"].state_dict()  # the weight lives in the head only
    assert torch.equal(model["embed"](ids), table[ids])
    torch.testing.assert_close(model["lm_head"](hidden), want_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 7, 64, 79, 80, 300, 600])
@pytest.mark.parametrize("in_features", [48, 150])
@pytest.mark.parametrize("out_features", [100, 150])
def test_packed_linear_matches_linear(rows, in_features, out_features):
    """The native panel-packed kernel, both schedules (streamed under 80 rows, whole panels from
    80): a ragged last panel, bias, several weight-row chunks with a ragged last one (150 inputs),
    equal row chunks past 256 rows, split by panels (2 panels) or by (chunk, panel) items (3
    panels, on an even number of threads)."""
    torch.manual_seed(rows)
    weight, bias = torch.randn(out_features, in_features), torch.randn(out_features)
    packed = ops.pack_linear_weight(weight)
    if packed is None:
        pytest.skip("no native packed linear on this CPU (AVX-512 only)")
    x = torch.randn(rows, in_features)
    for b in (None, bias):
        torch.testing.assert_close(ops.packed_linear(x, packed, out_features, b),
                                   torch.nn.functional.linear(x, weight, b),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 35, 300])
def test_float16_valued_weights_pack_at_half_width_with_the_same_sums(rows):
    """A weight whose every value is a float16 value (a checkpoint stored in float16) is packed as
    float16 panels, widened exactly in registers: bit for bit the float32 panels' products, in
    both schedules; the tied embedding's rows come back as float32."""
    torch.manual_seed(rows)
    weight = torch.randn(150, 96).half().float()
    packed = ops.pack_linear_weight(weight)
    if packed is None:
        pytest.skip("no native packed linear on this CPU (AVX-512 only)")
    assert packed.dtype == torch.float16
    as_float = torch.zeros(192, 96)
    as_float[:150] = weight
    as_float = as_float.view(3, 64, 96).transpose(1, 2).contiguous()  # the float32 layout
    x, bias = torch.randn(rows, 96), torch.randn(150)
    assert torch.equal(ops.packed_linear(x, packed, 150, bias),
                       ops.packed_linear(x, as_float, 150, bias))
    head = CPULinear(nn.Linear(96, 150, bias=False))
    head.packed = packed
    ids = torch.tensor([0, 63, 64, 149])
    assert head.rows(ids).dtype == torch.float32 and torch.equal(head.rows(ids), weight[ids])
    assert ops.pack_linear_weight(weight + 1e-4).dtype == torch.float32
