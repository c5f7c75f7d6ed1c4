"""GPTQT end to end: the binary-coded layout, the solver's steps, the checkpoint it writes (the
loader computes exactly the weights the solver reports), the engine serving it like its dense
twin, and clear errors for bad settings."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from optgptq import cli
from optgptq.compress.quant import pipeline
from optgptq.compress.quant.checkpoint import load_dequantized, save_checkpoint
from optgptq.compress.quant.gptqt import GPTQTSpec, fit_group, solve
from optgptq.compress.quant.pipeline import quantize_model
from optgptq.compress.quant.quantizer import QuantSpec
from optgptq.engine.llm import LLM
from optgptq.engine.sampling_params import SamplingParams
from optgptq.models.bcq_linear import GPTQTConfig, bcq_dense_weight
from optgptq_kernels.bcq import (bcq_linear_ref, dequantize_bcq_ref, levels, pack_planes,
                                 unpack_planes)
from tests.conftest import random_prompt


@pytest.mark.parametrize("bits", [2, 3])
def test_planes_round_trip_and_bit_order(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (96, 37), generator=g)
    planes = pack_planes(codes, bits)
    assert planes.dtype == torch.int32 and planes.shape == (bits, 3, 37)
    assert torch.equal(unpack_planes(planes), codes.int())
    k, n = 70, 5                                   # word 2, bit 6
    for i in range(bits):
        word = int(planes[i, 2, n]) & 0xFFFFFFFF
        assert (word >> 6) & 1 == (int(codes[k, n]) >> i) & 1


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_planes(torch.zeros(48, 4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="codes must lie"):
        pack_planes(torch.full((32, 4), 4), 2)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_planes(torch.zeros(32, 4, dtype=torch.long), 4)


@pytest.mark.parametrize("bits,group_size", [(3, 64), (2, 96), (3, -1)])
def test_dequantize_matches_the_formula(bits, group_size):
    g = torch.Generator().manual_seed(7)
    k, n = 160, 24
    groups = 1 if group_size == -1 else -(-k // group_size)
    codes = torch.randint(0, 1 << bits, (k, n), generator=g)
    alphas = torch.rand(groups, bits, n, generator=g).half()
    offsets = torch.randn(groups, n, generator=g).half()
    args = (pack_planes(codes, bits), alphas, offsets, group_size)
    w = dequantize_bcq_ref(*args, dtype=torch.float64)
    for row in (0, 63, 64, 100, 159):
        gi = 0 if group_size == -1 else row // group_size
        for col in (0, 11, 23):
            c = int(codes[row, col])
            expect = offsets[gi, col].double() + sum(
                alphas[gi, i, col].double() * (1 if (c >> i) & 1 else -1) for i in range(bits))
            assert abs(float(w[row, col]) - float(expect)) < 1e-6
    x = torch.randn(3, k, generator=g, dtype=torch.float64)
    bias = torch.randn(n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(bcq_linear_ref(x, *args, bias=bias), x @ w + bias)


def test_fit_group_recovers_a_grid_aligned_binary_code():
    """Weights that already are a binary code on the 5-bit grid (levels ``16 t0 + 9 t1 + 6 t2``
    of 31 steps, both extremes present) are fitted with float16 rounding error only."""
    g = torch.Generator().manual_seed(1)
    rows, cols = 12, 64
    start, step = torch.randn(rows, 1, generator=g), torch.rand(rows, 1, generator=g) + 0.1
    level_ints = torch.tensor([16 * (c & 1) + 9 * (c >> 1 & 1) + 6 * (c >> 2 & 1)
                               for c in range(8)], dtype=torch.float32)
    picks = torch.randint(0, 8, (rows, cols), generator=g)
    picks[:, 0], picks[:, 1] = 0, 7
    w = start + step * level_ints[picks]
    alphas, offsets = fit_group(w, torch.rand(cols, generator=g) + 0.5, GPTQTSpec(3, 5, 64))
    table = levels(alphas.unsqueeze(0), offsets.unsqueeze(0))[0]
    recon = table.gather(1, (w.unsqueeze(2) - table.unsqueeze(1)).abs().argmin(2))
    assert float((recon - w).abs().max() / w.abs().max()) < 2e-3


def _layer(seed: int, n: int = 48, k: int = 128):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(512, k, generator=g) @ mix            # correlated inputs
    return torch.randn(n, k, generator=g), 2 * x.t() @ x / x.shape[0]


def _output_error(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> float:
    d = w - q
    return float(torch.einsum("ij,jk,ik->", d, H, d))


def test_error_feedback_and_re_explore_lower_the_output_error():
    w, H = _layer(0)
    spec = GPTQTSpec(3, 5, 32)
    full = solve(w, H, spec).weight
    no_feedback = solve(w, torch.diag(H.diagonal()), spec).weight
    min_max_only = solve(w, H, GPTQTSpec(3, 5, 32, explore=(1.0, 1.0, 1))).weight
    err = _output_error(w, full, H)
    assert err < 0.8 * _output_error(w, no_feedback, H)
    assert err < _output_error(w, min_max_only, H)


@pytest.mark.parametrize("bits,group_size", [(3, 32), (2, 64), (2, -1)])
def test_checkpoint_tensors_stand_for_the_solved_weight(bits, group_size):
    w, H = _layer(bits, n=40, k=160)
    result = solve(w, H, GPTQTSpec(bits, group_size=group_size))
    assert result.codes.max() < 1 << bits
    tensors = result.tensors()
    dense = bcq_dense_weight(tensors, GPTQTConfig(bits, group_size))
    assert torch.equal(dense, result.weight)
    for part, rows in zip(result.split([16, 24]), (slice(0, 16), slice(16, 40))):
        assert torch.equal(bcq_dense_weight(part.tensors(),
                                            GPTQTConfig(bits, group_size)), result.weight[rows])


def test_bad_settings_are_rejected():
    cases = [({"bits": 4}, "bits must be one of"), ({"bits": 3, "intermediate_bits": 3},
             "intermediate_bits must lie in \\[4, 5\\]"), ({"intermediate_bits": 6},
             "intermediate_bits"), ({"group_size": 48}, "multiple of 32"),
             ({"explore": (1.2, 0.8, 5)}, "explore"), ({"explore": (0.8, 1.2, 1)}, "explore"),
             ({"damp": 0}, "damp")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            GPTQTSpec(**kwargs)
    with pytest.raises(ValueError, match="bits"):
        GPTQTConfig.from_hf({"quant_method": "gptqt", "bits": 4, "group_size": 64})
    with pytest.raises(ValueError, match="group_size"):
        GPTQTConfig.from_hf({"quant_method": "gptqt", "bits": 3, "group_size": 40})
    with pytest.raises(ValueError, match="in_features=48"):
        solve(torch.randn(8, 48), torch.eye(48), GPTQTSpec())


def write_gptqt(src, out, bits: int = 3, group_size: int = 32):
    """A GPTQT checkpoint of the HF folder ``src``, calibrated on random tokens."""
    calib = torch.randint(100, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
    spec = GPTQTSpec(bits, group_size=group_size)
    qm = quantize_model(src, spec, "gptqt", calib, progress=False)
    return save_checkpoint(qm, src, out, torch.float32)


def _dense_twin(quant, out):
    load_dequantized(quant).save_pretrained(str(out))
    for f in quant.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.mark.parametrize("name,bits,group_size", [("llama-gqa", 3, 32), ("bloom", 2, -1)])
def test_engine_serves_a_gptqt_checkpoint_like_its_dense_twin(tiny_models, tmp_path, name, bits,
                                                              group_size):
    quant = write_gptqt(tiny_models[name], tmp_path / "q", bits, group_size)
    qc = AutoConfig.from_pretrained(str(quant)).quantization_config
    assert qc["quant_method"] == "gptqt" and qc["bits"] == bits
    assert qc["group_size"] == group_size and qc["intermediate_bits"] == bits + 2
    twin = _dense_twin(quant, tmp_path / "dense")
    rng = torch.Generator().manual_seed(3)
    prompts = [random_prompt(rng, n) for n in (5, 33, 17)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    outs = [LLM(str(quant), device="cpu", quantization="gptqt").generate(prompts, params),
            LLM(str(twin), device="cpu").generate(prompts, params)]
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]
    with pytest.raises(ValueError, match="is a gptqt checkpoint"):
        LLM(str(quant), device="cpu", quantization="gptq")
    ids = torch.tensor([prompts[1]])
    assert not torch.equal(load_dequantized(tiny_models[name])(ids).logits,
                           load_dequantized(quant)(ids).logits)


def test_cli_quantizes_with_gptqt_and_rejects_bad_parameters(tiny_models, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(["the quiet garden letter said she never walked"] * 200))

    def run(*extra) -> int:
        return cli.main(["quantize", "--model", str(tiny_models["llama-mha"]), "--out",
                         str(tmp_path / "q"), "--calib", str(calib), "--num-samples", "4",
                         "--seq-len", "32", "--method", "gptqt", *extra])

    cases = [(["--bits", "4"], "bits must be one of \\(2, 3\\)"),
             (["--bits", "3", "--intermediate-bits", "3"], "intermediate_bits must lie"),
             (["--bits", "2", "--group-size", "48"], "multiple of 32"),
             (["--bits", "3", "--act-order"], "not supported with --method gptqt"),
             (["--bits", "3", "--explore", "0.8:1.2"], "LO:HI:STEPS"),
             (["--bits", "3", "--explore", "a:b:c"], "LO:HI:STEPS")]
    for extra, message in cases:
        assert run(*extra) == 2, message
        err = capsys.readouterr().err
        assert "optgptq: error:" in err and __import__("re").search(message, err), err
    assert cli.main(["quantize", "--model", str(tiny_models["llama-mha"]), "--out",
                     str(tmp_path / "q"), "--method", "rtn", "--intermediate-bits", "5"]) == 2
    assert "apply to --method gptqt only" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    assert run("--bits", "2", "--group-size", "64", "--intermediate-bits", "3",
               "--explore", "0.8:1.0:3") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "gptqt" and summary["modules"] == 14
    qc = AutoConfig.from_pretrained(str(tmp_path / "q")).quantization_config
    assert (qc["bits"], qc["group_size"], qc["intermediate_bits"]) == (2, 64, 3)
    assert qc["explore"] == [0.8, 1.0, 3]


def test_pipeline_checks_spec_and_layout(tiny_models):
    calib = torch.randint(100, 49152, (2, 16))
    with pytest.raises(ValueError, match="takes a GPTQTSpec, got QuantSpec"):
        quantize_model(tiny_models["llama-gqa"], QuantSpec(3), "gptqt", calib)
    with pytest.raises(ValueError, match="needs a calibration batch"):
        quantize_model(tiny_models["llama-gqa"], GPTQTSpec(), "gptqt")
    layers = torch.nn.ModuleList([torch.nn.ModuleDict({"up": torch.nn.Linear(48, 32)})])
    with pytest.raises(ValueError, match="layer 0 up: in_features=48"):
        pipeline.check_packable(layers, ["up"], GPTQTSpec())
