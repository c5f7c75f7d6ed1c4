"""Engine generation against transformers: greedy token equality on every path that must be exact."""

import pytest
import torch

from optgptq.config import EngineConfig
from optgptq.engine.llm import LLM
from optgptq.engine.llm_engine import LLMEngine
from optgptq.engine.sampling_params import SamplingParams
from tests.conftest import hf_greedy, poison_rows, random_prompt

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def prompts(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [random_prompt(g, n) for n in lengths]


@pytest.mark.parametrize("name", ["llama-mha", "llama-gqa", "bloom"])
def test_batched_greedy_equals_transformers(tiny_models, name):
    path = tiny_models[name]
    llm = LLM(str(path), device="cpu", num_blocks=96, block_size=4)
    ps = prompts(1, [3, 9, 16, 31, 50])
    outs = llm.generate(ps, GREEDY)
    for p, out in zip(ps, outs):
        assert out.token_ids == hf_greedy(path, p, 12)
        assert out.finish_reason == "length"


@pytest.mark.parametrize("name", ["llama-gqa", "bloom"])
def test_chunked_prefill_equals_whole_prefill(tiny_models, name):
    path = tiny_models[name]
    ps = prompts(2, [70, 45, 5])
    whole = LLM(str(path), device="cpu", num_blocks=96, block_size=4, max_num_batched_tokens=512).generate(ps, GREEDY)
    chunked_llm = LLM(str(path), device="cpu", num_blocks=96, block_size=4, max_num_batched_tokens=7)
    chunked = chunked_llm.generate(ps, GREEDY)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in whole]
    assert chunked[0].token_ids == hf_greedy(path, ps[0], 12)


def test_prefix_hit_equals_miss_and_is_counted(tiny_models):
    path = tiny_models["llama-gqa"]
    base = prompts(3, [40])[0]
    variant = base[:33] + prompts(4, [6])[0]
    llm = LLM(str(path), device="cpu", num_blocks=96, block_size=4)
    first = llm.generate([base], GREEDY)[0]
    stats = llm.engine.stats().pool
    assert stats.prefix_hit_tokens == 0
    second = llm.generate([variant], GREEDY)[0]
    stats = llm.engine.stats().pool
    assert second.num_cached_tokens == 32 and stats.prefix_hit_tokens == 32
    cold = LLM(str(path), device="cpu", num_blocks=96, block_size=4, enable_prefix_caching=False)
    assert second.token_ids == cold.generate([variant], GREEDY)[0].token_ids
    assert first.token_ids == hf_greedy(path, base, 12)


def test_preemption_by_recompute_gives_same_tokens(tiny_models):
    path = tiny_models["llama-mha"]
    ps = prompts(5, [12, 12, 12, 12])
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    roomy = LLM(str(path), device="cpu", num_blocks=128, block_size=4).generate(ps, params)
    tight_llm = LLM(str(path), device="cpu", num_blocks=16, block_size=4)  # 4 x 8 blocks needed, 16 exist
    tight = tight_llm.generate(ps, params)
    assert tight_llm.engine.stats().preemptions > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]


def test_logprobs_match_transformers(tiny_models):
    path = tiny_models["llama-gqa"]
    p = prompts(6, [10])[0]
    out = LLM(str(path), device="cpu", num_blocks=32, block_size=4).generate(
        [p], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=True))[0]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    logits = hf(torch.tensor([p + out.token_ids])).logits[0, len(p) - 1:-1]
    ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.token_ids).view(-1, 1))[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), ref, rtol=1e-4, atol=1e-4)


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_models):
    llm = LLM(str(tiny_models["llama-mha"]), device="cpu", num_blocks=96, block_size=4)
    ps = prompts(7, [8, 20, 14])
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=123,
                            ignore_eos=True)
    alone = llm.generate([ps[0]], seeded)[0].token_ids
    other = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
    together = llm.generate(ps, [seeded, other, other])[0].token_ids
    assert alone == together
    different = llm.generate([ps[0]], SamplingParams(max_tokens=10, temperature=0.9, top_k=50,
                                                     top_p=0.9, seed=124, ignore_eos=True))
    assert different[0].token_ids != alone


def test_top_k_one_is_greedy(tiny_models):
    llm = LLM(str(tiny_models["bloom"]), device="cpu", num_blocks=64, block_size=4)
    p = prompts(8, [9])
    sampled = llm.generate(p, SamplingParams(max_tokens=8, temperature=1.5, top_k=1, ignore_eos=True))
    greedy = llm.generate(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert sampled[0].token_ids == greedy[0].token_ids


def test_stop_token_ids_and_stop_strings(tiny_models):
    llm = LLM(str(tiny_models["llama-mha"]), device="cpu", num_blocks=64, block_size=4)
    p = prompts(9, [10])
    full = llm.generate(p, GREEDY)[0]
    stop_tok = full.token_ids[4]
    first = full.token_ids.index(stop_tok)
    out = llm.generate(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                         stop_token_ids=[stop_tok]))[0]
    assert out.token_ids == full.token_ids[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_tok)
    stop_str = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    out = llm.generate(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                         stop=[stop_str]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_str
    assert out.text == full.text[:full.text.index(stop_str)]


def test_eos_stops_unless_ignored(tiny_models):
    llm = LLM(str(tiny_models["llama-mha"]), device="cpu", num_blocks=64, block_size=4)
    p = prompts(10, [10])[0]
    full = llm.generate([p], GREEDY)[0]
    llm.engine.eos_token_ids = {full.token_ids[2]}
    out = llm.generate([p], SamplingParams(max_tokens=12, temperature=0))[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[:full.token_ids.index(full.token_ids[2]) + 1]


def test_denormal_temperature_and_top_p_are_greedy(tiny_models):
    """A temperature below GREEDY_BELOW is greedy (dividing by 1e-39 overflowed every logit), and
    top-p keeps the top token even where p rounds to 0 in float32; the batch does not fail."""
    llm = LLM(str(tiny_models["llama-gqa"]), device="cpu", num_blocks=96, block_size=4)
    ps = prompts(12, [6, 11, 17])
    greedy = [o.token_ids for o in llm.generate(ps, GREEDY)]
    for kwargs in ({"temperature": 1e-39}, {"temperature": 1e-6},
                   {"top_p": 1e-320}, {"top_p": 1e-46}, {"top_p": 1e-45}):
        odd = SamplingParams(max_tokens=12, ignore_eos=True, **{"temperature": 1.0, **kwargs})
        outs = llm.generate(ps, [odd, GREEDY, odd])  # mixed with plain greedy rows
        assert [o.token_ids for o in outs] == greedy, kwargs


def test_a_request_that_cannot_be_sampled_fails_alone(tiny_models, monkeypatch):
    """A request whose logits are NaN fails and is aborted (blocks freed); the others in its
    batch, greedy and seeded, get exactly the tokens they get without it."""
    path = str(tiny_models["llama-mha"])
    ps = prompts(13, [7, 13, 5, 21])
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    bad = SamplingParams(max_tokens=12, temperature=0.8, ignore_eos=True)
    params = [GREEDY, seeded, bad, GREEDY]
    llm = LLM(path, device="cpu", num_blocks=96, block_size=4)
    expected = [o.token_ids for o in llm.generate(ps[:2] + ps[3:], params[:2] + params[3:])]

    poison_rows(monkeypatch, lambda seq: seq.token_ids[:seq.num_prompt_tokens] == ps[2])
    engine = LLMEngine(EngineConfig(model=path, device="cpu", num_blocks=96, block_size=4))
    free = engine.pool.stats().free_blocks
    ids = [engine.add_request(p, sp, f"r{i}", stream=False)
           for i, (p, sp) in enumerate(zip(ps, params))]
    done, failures = {}, []
    while engine.has_unfinished_requests():
        done.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
        failures += engine.take_failures()
        if failures:
            assert not any(s.request_id == "r2" for s in engine.scheduler.running)
    assert [rid for rid, _ in failures] == ["r2"] and "sampling failed" in failures[0][1]
    assert [done[rid] for rid in ids if rid != "r2"] == expected and "r2" not in done
    assert engine.take_failures() == []
    stats = engine.pool.stats()
    assert stats.free_blocks == free and stats.used_blocks == 0

    with pytest.raises(RuntimeError, match=r"1 of 4 requests failed \(prompt 2: sampling failed"):
        llm.generate(ps, params)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.pool.stats().free_blocks == llm.engine.pool.num_blocks
