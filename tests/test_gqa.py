"""Opt-GQA conversion: bad input, groupings, merges, exact recovery, loading, BLOOM, auto, CLI."""

import copy
import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from optgptq.cli import main
from optgptq.compress.gqa import auto as gqa_auto, convert as gqa, recover as gqa_recover
from optgptq.compress.gqa.grouping import (EXACT_LIMIT, num_partitions, partition_score,
                                           similarity_groups)
from optgptq.engine.llm import LLM
from optgptq.engine.sampling_params import SamplingParams
from tests.conftest import hf_greedy, random_prompt


def calib_tokens(seed: int, n: int = 6, length: int = 40) -> torch.Tensor:
    return torch.randint(100, 49152, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def rel_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_target_heads_must_divide_and_not_exceed(tiny_models):
    model = gqa.load_model(tiny_models["llama-gqa"])  # 8 heads, 2 K/V heads
    with pytest.raises(ValueError, match="divisor of the model's 8 attention heads"):
        gqa.convert_model(model, 3, "contiguous", "mean")
    with pytest.raises(ValueError, match="more than the model's 2 K/V heads"):
        gqa.convert_model(model, 4, "contiguous", "mean")
    with pytest.raises(ValueError, match="needs calibration tokens"):
        gqa.convert_model(model, 1, "similarity", "mean")
    with pytest.raises(ValueError, match="grouping='nearest'"):
        gqa.convert_model(model, 1, "nearest", "mean")


def test_unsupported_architecture(tmp_path, capsys):
    GPT2Config(n_layer=1, n_embd=32, n_head=4, architectures=["GPT2LMHeadModel"]).save_pretrained(
        str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported"):
        gqa.load_model(tmp_path / "gpt2")
    code = main(["convert", "--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o"),
                 "--num-kv-heads", "1", "--grouping", "contiguous"])
    assert code == 2 and "not supported by the GQA conversion" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_contiguous_mean_pools_neighbouring_heads(tiny_models):
    model = gqa.load_model(tiny_models["llama-mha"])  # 4 heads of 16
    att = model.model.layers[1].self_attn
    k_old, q_old = att.k_proj.weight.clone(), att.q_proj.weight.clone()
    o_old = att.o_proj.weight.clone()
    result = gqa.convert_model(model, 2, "contiguous", "mean")
    assert result.groups[1] == [[0, 1], [2, 3]] and result.calib_loss is None
    att = model.model.layers[1].self_attn
    heads = k_old.view(4, 16, -1)
    expected = torch.cat([(heads[0] + heads[1]) / 2, (heads[2] + heads[3]) / 2])
    torch.testing.assert_close(att.k_proj.weight, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(att.q_proj.weight, q_old) and torch.equal(att.o_proj.weight, o_old)
    assert model.config.num_key_value_heads == 2 and att.num_key_value_groups == 2


def test_similarity_finds_planted_groups_and_reproduces_logits(tiny_models):
    original = gqa.load_model(tiny_models["llama-gqa"])  # 8 heads sharing 2 K/V heads
    ids = calib_tokens(1)
    ref = logits(original, ids)
    expanded = copy.deepcopy(original)
    perms = gqa.expand_to_mha(expanded, shuffle_seed=7)
    assert expanded.config.num_key_value_heads == 8
    torch.testing.assert_close(logits(expanded, ids), ref, rtol=1e-4, atol=1e-4)
    planted = [sorted(sorted(i for i, p in enumerate(perm) if p // 4 == g) for g in range(2))
               for perm in perms]
    assert any(groups != [[0, 1, 2, 3], [4, 5, 6, 7]] for groups in planted)
    contiguous = copy.deepcopy(expanded)
    gqa.convert_model(contiguous, 2, "contiguous", "mean", calib_tokens(2))
    result = gqa.convert_model(expanded, 2, "similarity", "mean", calib_tokens(2))
    assert result.groups == planted
    torch.testing.assert_close(logits(expanded, ids), ref, rtol=1e-4, atol=1e-4)
    assert rel_error(logits(contiguous, ids), ref) > 100 * rel_error(logits(expanded, ids), ref)


def test_unshuffled_expansion_round_trips_bit_for_bit(tiny_models):
    original = gqa.load_model(tiny_models["llama-gqa"])
    model = copy.deepcopy(original)
    gqa.expand_to_mha(model)
    gqa.convert_model(model, 2, "similarity", "mean", calib_tokens(3))
    for (name, a), (_, b) in zip(original.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


def test_attention_biases_travel_with_their_heads():
    config = LlamaConfig(vocab_size=512, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, attention_bias=True,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(15)
    original = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in original.parameters():
            p.normal_(0, 0.3)
    ids = torch.randint(0, 512, (4, 24), generator=torch.Generator().manual_seed(16))
    ref = logits(original, ids)
    model = copy.deepcopy(original)
    perms = gqa.expand_to_mha(model, shuffle_seed=17)
    planted = [sorted(sorted(i for i, p in enumerate(perm) if p // 3 == g) for g in range(2))
               for perm in perms]
    assert gqa.convert_model(model, 2, "similarity", "mean", ids).groups == planted
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=1e-4)
    errors = {}
    for merge in gqa.MERGES:
        merged = copy.deepcopy(original)
        gqa.convert_model(merged, 1, "similarity", merge, ids)
        errors[merge] = rel_error(logits(merged, ids), ref)
    assert errors["lstsq"] < 0.95 * errors["mean"], errors


@pytest.mark.parametrize("name, heads", [("llama-mha", 2), ("llama-gqa", 1), ("bloom", 2)])
def test_lstsq_reduces_calibration_error(tiny_models, name, heads):
    original = gqa.load_model(tiny_models[name])
    ids = calib_tokens(4)
    ref = logits(original, ids)
    errors = {}
    for merge in gqa.MERGES:
        model = copy.deepcopy(original)
        gqa.convert_model(model, heads, "similarity", merge, ids)
        errors[merge] = rel_error(logits(model, ids), ref)
    assert errors["lstsq"] < 0.95 * errors["mean"], errors


def _engine_matches_transformers(path, seed: int, kv_heads: int | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    prompts = [random_prompt(g, n) for n in (5, 17, 30)]
    llm = LLM(str(path), device="cpu", num_blocks=64, block_size=4)
    if kv_heads is not None:
        assert llm.engine.runner.kv_caches[0][0].shape[0] == kv_heads
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(path, p, 8)


def test_converted_llama_folder_loads_in_transformers_and_engine(tiny_models, tmp_path):
    out = tmp_path / "gqa1"
    ids = calib_tokens(5)
    result = gqa.convert_folder(tiny_models["llama-gqa"], out, 1, "similarity", "lstsq", ids)
    assert result.calib_loss > 0
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert hf.config.num_key_value_heads == 1
    assert hf.model.layers[0].self_attn.k_proj.weight.shape == (8, 64)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors",
                                               "tokenizer.json", "generation_config.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    in_memory = gqa.load_model(tiny_models["llama-gqa"])
    gqa.convert_model(in_memory, 1, "similarity", "lstsq", ids)
    torch.testing.assert_close(logits(hf, ids), logits(in_memory, ids))
    _engine_matches_transformers(out, 6)


def test_bloom_groups_share_kv_and_keep_their_heads(tiny_models, tmp_path):
    out = tmp_path / "bloom2"
    source = gqa.load_model(tiny_models["bloom"])
    result = gqa.convert_folder(tiny_models["bloom"], out, 2, "similarity", "lstsq",
                                calib_tokens(8))
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert hf.config.num_key_value_heads == 2 and hf.config.kv_head_groups == result.groups
    for layer, old, groups in zip(hf.transformer.h, source.transformer.h, result.groups):
        w = layer.self_attention.query_key_value.weight.view(4, 3, 16, 64)
        w_old = old.self_attention.query_key_value.weight.view(4, 3, 16, 64)
        assert torch.equal(w[:, 0], w_old[:, 0])  # queries (and their ALiBi slopes) stay put
        for grp in groups:
            assert all(torch.equal(w[grp[0], 1:], w[h, 1:]) for h in grp)
    with pytest.raises(ValueError, match="BLOOM models are stored multi-head"):
        gqa.expand_to_mha(hf)
    _engine_matches_transformers(out, 9, kv_heads=2)


def test_engine_caches_one_kv_head_per_interleaved_bloom_group(tiny_models, tmp_path):
    """Groups that are not neighbours ([0, 2] and [1, 3]): the engine reorders the query heads
    with their ALiBi slopes, caches two K/V heads and still gives transformers' tokens."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "bloom-interleaved"
    shutil.copytree(tiny_models["bloom"], out)
    state = load_file(str(out / "model.safetensors"))
    for name, t in state.items():
        if name.endswith("query_key_value.weight") or name.endswith("query_key_value.bias"):
            heads = t.view(4, 3, 16, *t.shape[1:])
            heads[2, 1:] = heads[0, 1:]
            heads[3, 1:] = heads[1, 1:]
    save_file(state, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["kv_head_groups"] = [[[0, 2], [1, 3]]] * cfg["n_layer"]
    (out / "config.json").write_text(json.dumps(cfg))
    _engine_matches_transformers(out, 10, kv_heads=2)


def test_auto_picks_the_best_fitting_option_and_prints_table(tiny_models, tmp_path, capsys):
    model = gqa.load_model(tiny_models["llama-mha"])  # 2 layers x 4 heads x 16: 128 B/head/token
    assert gqa_auto.kv_bytes_per_token(model.config, 1) == 128
    ids = calib_tokens(10)
    options, chosen, converted, result = gqa_auto.choose_num_kv_heads(model, ids, 300)
    assert [(o.num_kv_heads, o.fits) for o in options] == [(4, False), (2, True), (1, True)]
    assert chosen.calib_loss == min(o.calib_loss for o in options if o.fits)
    assert converted.config.num_key_value_heads == chosen.num_kv_heads == result.num_kv_heads
    assert model.config.num_key_value_heads == 4
    with pytest.raises(ValueError, match="below the smallest option"):
        gqa_auto.choose_num_kv_heads(model, ids, 100)
    budget = gqa_auto.token_budget(model, target_batch=2, target_context=100,
                                   accelerator_memory=int(2e7))
    assert budget == pytest.approx((1.8e7 - gqa_auto.weight_bytes(model)) / 200)
    code = main(["convert", "--model", str(tiny_models["llama-mha"]), "--out",
                 str(tmp_path / "auto"), "--num-kv-heads", "auto", "--kv-budget", "300",
                 "--calib", str(_text_file(tmp_path)), "--num-samples", "4", "--seq-len", "16",
                 "--recover-seconds", "0", "--check-samples", "0", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and "KV bytes/token" in printed and "<- chosen" in printed
    rows = [line.split() for line in printed.splitlines()]
    assert ["4", "512", "no", "-"] in rows and ["2", "256", "yes"] in [r[:3] for r in rows]
    assert (tmp_path / "auto" / "config.json").is_file()


def _text_file(tmp_path):
    words = ["attention", "heads", "share", "keys", "values", "groups", "memory", "cache"]
    g = torch.Generator().manual_seed(11)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (600,), generator=g).tolist())
    path = tmp_path / "calib.txt"
    path.write_text(text)
    return path


def test_cli_convert_and_its_errors(tiny_models, tmp_path, capsys):
    out = tmp_path / "c"
    args = ["convert", "--model", str(tiny_models["llama-gqa"]), "--out", str(out),
            "--recover-seconds", "0", "--check-samples", "0"]
    assert main(args + ["--num-kv-heads", "1", "--grouping", "contiguous", "--quiet"]) == 0
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.num_key_value_heads == 1
    assert main(args + ["--num-kv-heads", "1", "--grouping", "contiguous"]) == 2
    assert "already exists" in capsys.readouterr().err
    args[4] = str(tmp_path / "d")
    assert main(args + ["--num-kv-heads", "3"]) == 2
    assert "divisor" in capsys.readouterr().err
    assert main(args + ["--num-kv-heads", "auto"]) == 2
    assert "--kv-budget" in capsys.readouterr().err
    assert main(args + ["--num-kv-heads", "1", "--kv-budget", "9"]) == 2
    assert "only apply with --num-kv-heads auto" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("train", ["kv", "qkvo"])
def test_recovery_reduces_the_distillation_loss_and_trains_only_attention(tiny_models, train):
    teacher = gqa.load_model(tiny_models["llama-gqa"])      # 8 heads, 2 K/V heads -> 1
    student = copy.deepcopy(teacher)
    gqa.convert_model(student, 1, "contiguous", "mean")
    ids = calib_tokens(20, n=8, length=32)
    before = gqa_recover.mean_distill_loss(student, teacher, ids)
    old = {n: p.clone() for n, p in student.named_parameters()}
    rec = gqa_recover.recover(student, teacher, ids, 0, 12, train, lr=1e-3, device="cpu",
                              progress=False)
    after = gqa_recover.mean_distill_loss(student, teacher, ids)
    assert rec.steps == 12 and rec.tokens == 12 * 4 * 32 and after < 0.98 * before
    moved = {n for n, p in student.named_parameters() if not torch.equal(p, old[n])}
    names = gqa_recover.TRAINABLE[train]
    assert moved == {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in names}
    assert not any(p.requires_grad for p in student.parameters()) and not student.training
    with pytest.raises(ValueError, match="Llama-family models only"):
        gqa_recover.trainable_parameters(gqa.load_model(tiny_models["bloom"]), "kv")


def test_cli_convert_recovers_estimates_warns_and_writes_a_loadable_folder(tiny_models,
                                                                             tmp_path, capsys):
    out = tmp_path / "rec"
    args = ["convert", "--model", str(tiny_models["llama-gqa"]), "--num-kv-heads", "1",
            "--grouping", "contiguous", "--calib", str(_text_file(tmp_path)), "--num-samples",
            "4", "--seq-len", "16", "--check-samples", "2", "--recover-steps", "3",
            "--recover-seconds", "0", "--device", "cpu", "--quiet"]
    assert main(args + ["--out", str(out), "--warn-above", "-1"]) == 0
    captured = capsys.readouterr()
    assert "recovery (qkvo, 3 steps" in captured.out
    assert "held-out estimate (32 calibration tokens" in captured.err
    assert "optgptq: warning: the GQA conversion raised" in captured.err
    assert main(args + ["--out", str(tmp_path / "quiet"), "--warn-above", "1e9"]) == 0
    captured = capsys.readouterr()
    assert "held-out estimate" in captured.err and "warning" not in captured.err
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert hf.config.num_key_value_heads == 1
    _engine_matches_transformers(out, 6)


def test_saved_folder_keeps_the_source_dtype(tiny_models, tmp_path):
    model = gqa.load_model(tiny_models["llama-gqa"]).to(torch.bfloat16)
    gqa.save_folder(model, tiny_models["llama-gqa"], tmp_path / "out")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_interrupted_write_leaves_no_folder(tiny_models, tmp_path, monkeypatch):
    model = gqa.load_model(tiny_models["llama-gqa"])

    def broken(path, **kwargs):
        (tmp_path / "partial-marker").write_text(path)
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(OSError):
        gqa.save_folder(model, tiny_models["llama-gqa"], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial-marker"]


def test_partition_search_recovers_planted_groups_beyond_exact_limit():
    g = torch.Generator().manual_seed(12)
    n, size = 16, 4
    assert num_partitions(n, size) > EXACT_LIMIT
    labels = torch.randperm(n, generator=g) % (n // size)
    sim = torch.rand(n, n, generator=g) * 0.5
    sim = (sim + sim.T) / 2
    sim[labels[:, None] == labels[None, :]] += 0.5
    groups = similarity_groups(sim, n // size)
    planted = sorted(sorted(torch.nonzero(labels == c).view(-1).tolist()) for c in range(4))
    assert groups == planted
    small = sim[:8, :8]  # exact search: no partition scores higher than its answer
    best = similarity_groups(small, 2)
    scores = [partition_score(small, [list(c), [h for h in range(8) if h not in c]])
              for c in itertools.combinations(range(8), 4)]
    assert partition_score(small, best) == pytest.approx(max(scores))


@pytest.mark.slow
def test_smollm2_expanded_to_mha_converts_back_exactly(smollm2_path):
    original = gqa.load_model(smollm2_path)  # 9 heads, 3 K/V heads, 30 layers
    ids = torch.randint(100, 49152, (2, 48), generator=torch.Generator().manual_seed(13))
    ref = logits(original, ids)
    model = original
    perms = gqa.expand_to_mha(model, shuffle_seed=14)
    planted = [sorted(sorted(i for i, p in enumerate(perm) if p // 3 == g) for g in range(3))
               for perm in perms]
    result = gqa.convert_model(model, 3, "similarity", "mean", ids, progress=False)
    assert result.groups == planted
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=1e-3)
