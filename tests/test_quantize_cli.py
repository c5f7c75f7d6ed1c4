"""Quantizing tiny models end to end: the GPTQ checkpoint the CLI writes is served by the engine
exactly like its dequantized dense twin, transformers reads its config, bad input exits 2."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoConfig, GPT2Config

from optgptq import cli
from optgptq.compress.eval import kv_bytes_per_token, perplexity
from optgptq.compress.quant import checkpoint
from optgptq.compress.quant.checkpoint import load_dequantized
from optgptq.engine.llm import LLM
from optgptq.engine.sampling_params import SamplingParams
from tests.conftest import random_prompt


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    rng = random.Random(11)
    words = ["the", "garden", "letter", "Mr", "Darcy", "walked", "rain", "quiet", "sister",
             "of", "and", "a", "ball", "morning", "said", "she", "never", "happy", "town"]
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(". ".join(" ".join(rng.choice(words) for _ in range(12))
                              for _ in range(300)))
    return path


def _quantize(model, out, calib, *extra) -> int:
    return cli.main(["quantize", "--model", str(model), "--out", str(out), "--calib", str(calib),
                     "--num-samples", "8", "--seq-len", "64", "--dtype", "float32", *extra])


@pytest.mark.parametrize("name,extra", [
    ("llama-gqa", ["--bits", "4", "--group-size", "48", "--act-order", "--asym", "--mse"]),
    ("bloom", ["--bits", "8", "--group-size", "-1", "--method", "rtn", "--sym", "--no-mse"]),
    ("llama-mha", ["--bits", "2", "--group-size", "32", "--static-groups", "--act-order"]),
])
def test_engine_serves_the_checkpoint_like_its_dense_twin(tiny_models, calib_text, tmp_path,
                                                          name, extra, capsys, monkeypatch):
    # the native CPU kernel's default INT8 activations can flip a tiny random model's near ties;
    # two INT8 pieces (~16 bits, optgptq_kernels/gptq_cpu.py) keep it within float rounding
    monkeypatch.setenv("OPTGPTQ_CPU_GPTQ_ACT", "int16")
    out = tmp_path / "q"
    assert _quantize(tiny_models[name], out, calib_text, *extra) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(out.resolve())
    assert summary["modules"] == (8 if name == "bloom" else 14)     # linears in 2 layers
    qc = AutoConfig.from_pretrained(str(out)).quantization_config
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert qc["bits"] == int(extra[1]) and qc["group_size"] == int(extra[3])
    # static groups keep g_idx = k // group_size: not desc_act (vLLM >= 0.32 loads only that)
    assert qc["desc_act"] == ("--act-order" in extra and "--static-groups" not in extra)
    assert qc["sym"] == ("--sym" in extra)
    assert qc["meta"]["mse"] == (0.0 if "--no-mse" in extra else 2.4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp folder left
    twin = tmp_path / "dense"
    load_dequantized(out).save_pretrained(str(twin))
    for f in out.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            (twin / f.name).write_bytes(f.read_bytes())
    rng = torch.Generator().manual_seed(4)
    prompts = [random_prompt(rng, n) for n in (6, 29)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    got = [[o.token_ids for o in LLM(str(d), device="cpu").generate(prompts, params)]
           for d in (out, twin)]
    assert got[0] == got[1]
    float_model = load_dequantized(tiny_models[name])
    quant_model = load_dequantized(out)
    ids = torch.tensor([prompts[1]])
    assert not torch.equal(float_model(ids).logits, quant_model(ids).logits)


def test_defaults_are_asymmetric_act_order_clipping_search_and_estimate(tiny_models, calib_text,
                                                                       tmp_path, capsys):
    """No quantization flag: the chosen defaults (README.md says why), the held-out estimate in
    the summary; GPTQT, to which act-order and the clipping search do not apply, still runs."""
    out = tmp_path / "q"
    assert _quantize(tiny_models["llama-mha"], out, calib_text, "--group-size", "32") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    qc = AutoConfig.from_pretrained(str(out)).quantization_config
    assert (qc["sym"], qc["desc_act"], qc["meta"]["mse"], qc["damp_percent"]) == (
        False, True, 2.4, 0.01)
    assert summary["check_tokens"] == 8 * 64 and summary["check_ppl_before"] > 1
    assert summary["seconds"] >= summary["quantize_seconds"] > 0
    assert _quantize(tiny_models["llama-mha"], tmp_path / "t", calib_text, "--method", "gptqt",
                     "--bits", "2", "--group-size", "32") == 0
    assert AutoConfig.from_pretrained(str(tmp_path / "t")).quantization_config["bits"] == 2


def test_estimate_warns_past_the_threshold(tiny_models, calib_text, tmp_path, capsys):
    args = ["--bits", "2", "--group-size", "32", "--method", "rtn", "--check-samples", "2"]
    assert _quantize(tiny_models["llama-mha"], tmp_path / "a", calib_text, *args,
                     "--warn-above", "-1") == 0
    err = capsys.readouterr().err
    assert "held-out estimate (128 calibration tokens not used for fitting)" in err
    assert "optgptq: warning: rtn 2-bit raised the held-out perplexity estimate" in err
    assert _quantize(tiny_models["llama-mha"], tmp_path / "b", calib_text, *args,
                     "--warn-above", "1e9") == 0
    assert "warning" not in capsys.readouterr().err
    assert _quantize(tiny_models["llama-mha"], tmp_path / "c", calib_text, *args[:-2],
                     "--check-samples", "0") == 0
    assert "held-out estimate" not in capsys.readouterr().err


def test_interrupted_write_leaves_nothing(tiny_models, calib_text, tmp_path, monkeypatch):
    def fail(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        _quantize(tiny_models["llama-mha"], tmp_path / "q", calib_text, "--method", "rtn")
    assert list(tmp_path.iterdir()) == []


def test_bad_input_exits_2_with_a_clear_message(tiny_models, calib_text, tmp_path, capsys):
    llama = tiny_models["llama-mha"]
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "short.txt").write_text("too short")
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(
        str(gpt2))
    (tmp_path / "exists").mkdir()
    cases = [
        (["--bits", "5"], llama, calib_text, "bits must be one of"),
        ([], llama, tmp_path / "empty.txt", "empty"),
        ([], llama, tmp_path / "short.txt", "too short"),
        ([], gpt2, calib_text, "GPT2LMHeadModel is not supported"),
        (["--bits", "3"], tiny_models["llama-gqa"], calib_text, "k_proj.*multiples of 32"),
        (["--group-size", "0"], llama, calib_text, "group_size"),
        (["--method", "gptqt", "--bits", "3", "--mse"], llama, calib_text, "--mse are not"),
    ]
    for extra, model, calib, message in cases:
        assert _quantize(model, tmp_path / "q", calib, *extra) == 2, message
        err = capsys.readouterr().err
        assert "optgptq: error:" in err and __import__("re").search(message, err), err
    assert _quantize(llama, tmp_path / "exists", calib_text, "--method", "rtn") == 2
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_perplexity_windows_match_direct_computation(tiny_models):
    model = load_dequantized(tiny_models["llama-mha"])
    ids = torch.randint(100, 49152, (200,), generator=torch.Generator().manual_seed(2))

    def direct(chunk):
        logits = model(chunk.unsqueeze(0)).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum")

    ppl, n = perplexity(model, ids, window=256, stride=256)
    assert n == 199 and abs(ppl - float(torch.exp(direct(ids) / 199))) < 1e-3 * ppl
    ppl, n = perplexity(model, ids, window=100, stride=100)       # disjoint windows
    expect = torch.exp((direct(ids[:100]) + direct(ids[100:])) / 198)
    assert n == 198 and abs(ppl - float(expect)) < 1e-3 * ppl
    ppl_overlap, n = perplexity(model, ids, window=100, stride=50)
    assert n == 199 and ppl_overlap != ppl
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, ids, window=100, stride=101)


def test_eval_cli_reports_sizes(tiny_models, calib_text, capsys):
    assert cli.main(["eval", "--model", str(tiny_models["llama-gqa"]), "--text", str(calib_text),
                     "--max-tokens", "300", "--window", "128", "--stride", "64"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens_scored"] == 299 and result["perplexity"] > 1
    assert result["kv_bytes_per_token"] == 2 * 2 * 2 * 8 * 2     # K,V x layers x heads x dim x fp16
    assert kv_bytes_per_token(tiny_models["llama-mha"]) == 2 * 2 * 4 * 16 * 2
    assert result["weight_bytes"] > 49152 * 64 * 4


def test_compress_converts_then_quantizes(tiny_models, calib_text, tmp_path, capsys):
    out = tmp_path / "c"
    assert cli.main(["compress", "--model", str(tiny_models["llama-mha"]), "--out", str(out),
                     "--num-kv-heads", "2", "--grouping", "similarity", "--merge", "mean",
                     "--calib", str(calib_text), "--num-samples", "8", "--seq-len", "64",
                     "--bits", "4", "--group-size", "32", "--recover-steps", "2",
                     "--recover-seconds", "0", "--quiet"]) == 0
    config = AutoConfig.from_pretrained(str(out))
    assert config.num_key_value_heads == 2 and config.quantization_config["bits"] == 4
    assert kv_bytes_per_token(out) == kv_bytes_per_token(tiny_models["llama-mha"]) // 2
    assert [p.name for p in tmp_path.iterdir()] == ["c"]         # the GQA temp folder is gone
    rng = torch.Generator().manual_seed(8)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    assert len(LLM(str(out), device="cpu").generate([random_prompt(rng, 9)],
                                                    params)[0].token_ids) == 5
    capsys.readouterr()
    assert cli.main(["compress", "--model", str(tiny_models["llama-mha"]), "--out",
                     str(tmp_path / "d"), "--num-kv-heads", "3", "--calib", str(calib_text)]) == 2
    assert "optgptq: error:" in capsys.readouterr().err


@pytest.mark.parametrize("precision,bf16_cpu", [("medium", True), ("medium", False),
                                                ("highest", True)])
def test_matmul_precision_covers_the_forward_not_the_hessians_or_solver(tiny_models, monkeypatch,
                                                                        precision, bf16_cpu):
    from optgptq.compress.quant import gptq, pipeline
    from optgptq.compress.quant.quantizer import QuantSpec

    seen = {"solve": set(), "gram": set(), "forward": set()}

    def spy(name, fn, attention=False):
        def wrapped(*args, **kwargs):
            state = torch.get_float32_matmul_precision()
            if attention:   # the model is _calibrate's first argument
                state = (state, args[0].config._attn_implementation)
            seen[name].add(state)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(gptq, "solve", spy("solve", gptq.solve))
    monkeypatch.setattr(gptq, "add_gram_", spy("gram", gptq.add_gram_))
    monkeypatch.setattr(pipeline, "_calibrate", spy("forward", pipeline._calibrate, True))
    monkeypatch.setattr(pipeline, "_cpu_has_bfloat16", lambda: bf16_cpu)
    calib = torch.randint(100, 49152, (4, 32), generator=torch.Generator().manual_seed(3))
    before = torch.get_float32_matmul_precision()
    qm = pipeline.quantize_model(tiny_models["llama-gqa"], QuantSpec(4, 32), "gptq", calib,
                                 progress=False, matmul_precision=precision)
    assert len(qm.results) == 14
    attention = pipeline._BF16_SDPA if precision == "medium" and bf16_cpu else "sdpa"
    assert seen == {"solve": {"highest"}, "gram": {"highest"},
                    "forward": {(precision, attention)}}
    assert torch.get_float32_matmul_precision() == before
    assert qm.model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="matmul_precision"):
        pipeline.quantize_model(tiny_models["llama-gqa"], QuantSpec(4, 32), "gptq", calib,
                                matmul_precision="low")


@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_bfloat16_calibration_attention_matches_sdpa(mask):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from optgptq.compress.quant.pipeline import _bf16_sdpa

    g = torch.Generator().manual_seed(6)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 3
    q, k, v = (torch.randn(2, h, 40, 32, generator=g) for h in (6, 2, 2))
    m = None
    if mask != "none":
        m = torch.rand(2, 1, 40, 40, generator=g) > 0.3
        m |= torch.eye(40, dtype=torch.bool)
        m = m if mask == "bool" else torch.zeros(m.shape).masked_fill(~m, float("-inf"))
    ref = sdpa_attention_forward(module, q, k, v, m, scaling=0.2)[0]
    out = _bf16_sdpa(module, q, k, v, m, scaling=0.2)[0]
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert float((out - ref).norm() / ref.norm()) < 1e-2
    assert not torch.equal(out, ref)
