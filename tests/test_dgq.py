"""DGQ end to end: the quantizer's two-phase search and smoothing, the checkpoint the CLI writes,
the engine serving it like the transformers model running the same A8W4 layers, and bad
settings rejected with clear errors."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

from optgptq import cli
from optgptq.compress.quant.checkpoint import load_dequantized, load_for_eval
from optgptq.compress.quant.dgq import DGQ, DGQSpec, coarse_search, fine_search, smoothing
from optgptq.compress.quant.gptq import rtn
from optgptq.compress.quant.quantizer import QuantSpec
from optgptq.engine.llm import LLM
from optgptq.engine.sampling_params import SamplingParams
from optgptq.models.dgq_linear import DGQConfig, dgq_dense_weight
from optgptq_kernels.dgq import dgq_linear_ref
from tests.conftest import random_prompt


def _calibration(g: torch.Generator, t: int, k: int, outlier: float = 0.0) -> torch.Tensor:
    """Correlated inputs ``[t, k]``; ``outlier`` scales two channels up."""
    x = torch.randn(t, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    if outlier:
        x[:, [3, 17]] *= outlier
    return x


def _output_error(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> float:
    return float((x @ w.t() - y).square().sum() / x.shape[0])


def test_smoothing_scales_channels_above_the_percentile_down_to_it():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    t = smoothing(a, 75.0)                       # the 75th percentile of a is 4
    assert t.tolist() == [1.0, 1.0, 1.0, 1.0, 25.0]
    assert torch.equal(smoothing(a, 100.0), torch.ones(5))
    assert torch.equal(smoothing(torch.zeros(4), 50.0), torch.ones(4))


def _group_errors(W, H, scales, zeros, width):
    errs = []
    for g in range(scales.shape[0]):
        cols = slice(g * width, (g + 1) * width)
        s, z = scales[g][:, None], zeros[g][:, None]
        e = W[:, cols] - s * (torch.clamp(torch.round(W[:, cols] / s) + z, 0, 15) - z)
        errs.append(((e @ H[cols, cols]) * e).sum(1))
    return torch.stack(errs)


def test_each_search_phase_is_no_worse_than_its_unclipped_point():
    """Both grids start at ratio 1 (no clipping), so each phase's choice is at most as bad as
    that point's, row by row (phase 1: group by group)."""
    g = torch.Generator().manual_seed(0)
    n, k = 24, 96
    x = _calibration(g, 512, k)
    H = x.t() @ x / x.shape[0]
    W = torch.randn(n, k, generator=g) * 0.05
    W[:, 5] *= 8
    spec, plain = DGQSpec(group_size=32), DGQSpec(group_size=32, fine_grid=1, coarse_grid=1)
    fine, zeros = fine_search(W, H, spec)
    fine1, zeros1 = fine_search(W, H, plain)
    e_search, e_plain = _group_errors(W, H, fine, zeros, 32), _group_errors(W, H, fine1, zeros1, 32)
    assert (e_search <= e_plain * (1 + 1e-6)).all() and (e_search < e_plain).any()
    s_c, u, q, err = coarse_search(W, H, fine, zeros, spec)
    _, _, _, err1 = coarse_search(W, H, fine, zeros, plain)
    assert (err <= err1 * (1 + 1e-6)).all() and (err < err1).any()
    assert u.min() >= 1 and u.max() <= 127 and q.min() >= 0 and q.max() <= 15
    w8 = u.t().repeat_interleave(32, 1) * (q - zeros.t().repeat_interleave(32, 1))
    assert w8.abs().max() <= 127
    e = W - s_c[:, None] * w8
    torch.testing.assert_close(err, ((e @ H) * e).sum(1), rtol=1e-4, atol=1e-7)


def test_quantized_layer_is_valid_and_its_loss_is_the_output_error():
    g = torch.Generator().manual_seed(1)
    n, k = 40, 128
    x = _calibration(g, 1024, k, outlier=30.0)
    W = torch.randn(n, k, generator=g) * 0.05
    solver = DGQ(k)
    solver.add_batch(x[:600])
    solver.add_batch(x[600:])
    r = solver.quantize(W, DGQSpec(group_size=32, clip_percentile=99.0))
    assert r.smooth[[3, 17]].min() > 1 and (r.smooth >= 1).all()
    w8 = r.qscales.int().t().repeat_interleave(32, 1) * (r.codes.int() -
                                                         r.zeros.int().t().repeat_interleave(32, 1))
    assert w8.abs().max() <= 127
    dense = w8 * r.scales.float()[:, None] / r.smooth.float()[None, :]
    torch.testing.assert_close(r.weight, dense)
    assert r.loss == pytest.approx(_output_error(x, r.weight, x @ W.t()), rel=1e-3)
    t = r.tensors()
    y = dgq_linear_ref(x, t["qweight"], t["qzeros"], t["qscales"], t["scales"], t["smooth"], 32)
    w4_rtn = rtn(W, QuantSpec(4, 32, sym=False, mse=False)).weight       # weight-only, no search
    assert (y - x @ W.t()).norm() < 0.8 * (x @ w4_rtn.t() - x @ W.t()).norm()


def test_percentile_clipping_helps_with_activation_outliers():
    """Two input channels 60x larger than the rest (as in LLMs, the weights reading them are
    small): per-token INT8 loses the other channels unless they are scaled down to the 98th
    percentile, their factor moving into the weights."""
    g = torch.Generator().manual_seed(2)
    n, k = 32, 128
    x = _calibration(g, 1024, k, outlier=60.0)
    W = torch.randn(n, k, generator=g) * 0.05
    W[:, [3, 17]] *= 0.2
    errs = {}
    for p in (100.0, 98.0):
        solver = DGQ(k)
        solver.add_batch(x)
        t = solver.quantize(W, DGQSpec(group_size=32, clip_percentile=p)).tensors()
        y = dgq_linear_ref(x, t["qweight"], t["qzeros"], t["qscales"], t["scales"], t["smooth"],
                           32)
        errs[p] = _output_error(x, W, y)
    assert errs[98.0] < 0.5 * errs[100.0]


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="clip_percentile"):
        DGQSpec(clip_percentile=0)
    with pytest.raises(ValueError, match="group_size"):
        DGQSpec(group_size=0)
    with pytest.raises(ValueError, match="coarse_grid"):
        DGQSpec(coarse_grid=0)
    with pytest.raises(ValueError, match="fine_min_ratio"):
        DGQSpec(fine_min_ratio=1.5)
    good = DGQSpec().quantization_config()
    assert DGQConfig.from_hf(good).group_size == 128
    for key, value in (("bits", 3), ("act_bits", 16), ("group_size", 0), ("sym", True),
                       ("act_granularity", "per_tensor"), ("checkpoint_format", "gptq")):
        with pytest.raises(ValueError, match=key):
            DGQConfig.from_hf({**good, key: value})


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    rng = random.Random(5)
    words = ["the", "garden", "letter", "Mr", "Darcy", "walked", "rain", "quiet", "sister",
             "of", "and", "a", "ball", "morning", "said", "she", "never", "happy", "town"]
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(". ".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)))
    return path


def _quantize(model, out, calib, *extra) -> int:
    return cli.main(["quantize", "--model", str(model), "--out", str(out), "--calib", str(calib),
                     "--num-samples", "8", "--seq-len", "64", "--dtype", "float32",
                     "--method", "dgq", *extra])


@torch.no_grad()
def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("name,group_size", [("llama-gqa", 16), ("bloom", 24)])
def test_engine_serves_a_dgq_checkpoint_like_transformers_with_its_layers(
        tiny_models, calib_text, tmp_path, name, group_size, capsys, monkeypatch):
    out = tmp_path / "dgq"
    assert _quantize(tiny_models[name], out, calib_text, "--group-size", str(group_size)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "dgq" and summary["modules"] == (8 if name == "bloom" else 14)
    qc = AutoConfig.from_pretrained(str(out)).quantization_config
    assert qc["quant_method"] == "dgq" and qc["group_size"] == group_size
    assert qc["act_bits"] == 8 and qc["clip_percentile"] == 99.5
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        layer = "transformer.h.0.mlp.dense_h_to_4h" if name == "bloom" else \
            "model.layers.0.mlp.down_proj"
        assert f.get_tensor(f"{layer}.qscales").dtype == torch.int8
        assert f"{layer}.weight" not in f.keys()

    reference = load_for_eval(out)              # transformers with the DGQ layers (reference)
    rng = torch.Generator().manual_seed(6)
    prompts = [random_prompt(rng, n) for n in (5, 23)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expect = [_greedy(reference, p, 8) for p in prompts]
    served = LLM(str(out), device="cpu", quantization="dgq").generate(prompts, params)
    assert [o.token_ids for o in served] == expect
    if name == "llama-gqa":   # the Triton kernels (interpreter on CPU); slow there, so once
        monkeypatch.setenv("OPTGPTQ_KERNELS", "triton")
        served = LLM(str(out), device="cpu", quantization="dgq").generate(prompts, params)
        assert [o.token_ids for o in served] == expect

    # Against the dense twin (the same 4-bit weights, float activations): only the INT8
    # activations differ, within 5% of the logits' norm on these random models.
    ids = torch.tensor([prompts[1]])
    with torch.no_grad():
        a8, a16 = reference(ids).logits, load_dequantized(out)(ids).logits
    assert float((a8 - a16).norm() / a16.norm()) < 0.05
    with pytest.raises(ValueError, match="is a dgq checkpoint"):
        LLM(str(out), device="cpu", quantization="gptq")


@pytest.mark.parametrize("extra,message", [
    (["--bits", "3"], "4 bits only"),
    (["--act-order"], "does not apply"),
    (["--clip-percentile", "0"], "clip_percentile"),
    (["--coarse-grid", "0"], "coarse_grid"),
])
def test_cli_rejects_bad_dgq_settings(tiny_models, calib_text, tmp_path, extra, message,
                                      capsys):
    assert _quantize(tiny_models["llama-mha"], tmp_path / "q", calib_text, *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_dummy_dgq_weights_generate_from_a_config_alone(tiny_models, tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    cfg = json.loads((tiny_models["llama-gqa"] / "config.json").read_text())
    cfg["quantization_config"] = DGQSpec(group_size=32).quantization_config()
    (folder / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(folder), device="cpu", load_format="dummy", skip_tokenizer_init=True,
              num_blocks=32)
    layers = [m for m in llm.engine.runner.model.modules() if type(m).__name__ == "DGQLinear"]
    assert len(layers) == 14
    tensors = {k: getattr(layers[0], k) for k in ("qweight", "qzeros", "qscales", "scales",
                                                  "smooth")}
    w = dgq_dense_weight(tensors, DGQConfig(32))           # checks that the INT8 weight fits
    assert 0.01 < float(w.std()) < 0.04
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = llm.generate([[5, 9, 2, 7], [11, 3]], params)
    assert [len(o.token_ids) for o in outs] == [6, 6]
