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


def test_logit_bias_forces_a_token_and_min_tokens_holds_off_eos_and_stops(tiny_models):
    llm = LLM(str(tiny_models["llama-mha"]), device="cpu", num_blocks=64, block_size=4)
    p = prompts(14, [9])[0]
    forced = llm.generate([p], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                              logit_bias={4321: 100}))[0]
    assert forced.token_ids == [4321] * 6
    full = llm.generate([p], GREEDY)[0]
    llm.engine.eos_token_ids = {full.token_ids[0]}  # EOS would end it at once
    assert llm.generate([p], SamplingParams(max_tokens=12, temperature=0))[0].token_ids == \
        full.token_ids[:1]
    held = llm.generate([p], SamplingParams(max_tokens=12, temperature=0, min_tokens=4))[0]
    assert full.token_ids[0] not in held.token_ids[:4] and len(held.token_ids) > 4
    stop = llm.generate([p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                            stop=[full.text[:2]], min_tokens=3))[0]
    assert len(stop.token_ids) >= 3  # the stop string does not count within min_tokens


def test_penalties_and_bias_match_a_reference_loop(tiny_models):
    """Greedy decoding with every processor equals an argmax loop over transformers' logits
    adjusted by the per-row reference of tests/test_logits_processors.py."""
    from tests.conftest import _hf_model
    from tests.test_logits_processors import reference
    from optgptq.engine.sequence import Sequence

    path = tiny_models["llama-gqa"]
    p = prompts(15, [12])[0]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, presence_penalty=1.5,
                            frequency_penalty=0.7, repetition_penalty=1.3,
                            logit_bias={p[0]: 4.0, 777: -100})
    out = LLM(str(path), device="cpu", num_blocks=64, block_size=4).generate([p], params)[0]
    seq = Sequence("ref", p, params, 0, 10)
    model = _hf_model(str(path))
    with torch.no_grad():
        for _ in range(10):
            logits = model(torch.tensor([seq.token_ids])).logits[0, -1]
            seq.token_ids.append(int(reference(logits, seq).argmax()))
    assert out.token_ids == seq.output_token_ids


def test_top_logprobs_are_the_raw_distributions(tiny_models):
    path = tiny_models["llama-gqa"]
    p = prompts(16, [10])[0]
    params = SamplingParams(max_tokens=4, temperature=0.9, seed=3, ignore_eos=True,
                            presence_penalty=2, logprobs=True, top_logprobs=5)
    out = LLM(str(path), device="cpu", num_blocks=32, block_size=4).generate([p], params)[0]
    from tests.conftest import _hf_model

    with torch.no_grad():
        logits = _hf_model(str(path))(torch.tensor([p + out.token_ids])).logits[0, len(p) - 1:-1]
    ref = torch.log_softmax(logits, -1)
    for step, (token, top) in enumerate(zip(out.token_ids, out.top_logprobs)):
        values, ids = ref[step].topk(5)
        assert [i for i, _ in top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in top]), values, rtol=1e-4, atol=1e-4)
        assert out.logprobs[step] == pytest.approx(ref[step, token].item(), abs=1e-4)


def _count_forward_tokens(engine, monkeypatch) -> list[int]:
    counted = [0]
    execute = engine.runner.execute

    def counting(batch):
        counted[0] += sum(batch.num_new_tokens)
        return execute(batch)

    monkeypatch.setattr(engine.runner, "execute", counting)
    return counted


def test_n_choices_share_one_prefill(tiny_models, monkeypatch):
    """n=4 greedy choices: one prefill of the prompt (then one token per choice per step), the
    prompt's full blocks shared, and each choice equal to the single greedy answer."""
    path = tiny_models["llama-gqa"]
    p = prompts(17, [10])[0]
    engine = LLMEngine(EngineConfig(model=str(path), device="cpu", num_blocks=96, block_size=4))
    forward = _count_forward_tokens(engine, monkeypatch)
    engine.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, n=4), "r")
    first = engine.step()
    assert sorted(o.index for o in first) == [0, 1, 2, 3] and forward[0] == 10
    # 3 blocks hold the prompt (2 full, shared); each other choice copies the partial third
    assert engine.pool.stats().used_blocks == 3 + 3
    outs = {}
    while engine.has_unfinished_requests():
        outs.update((o.index, o) for o in engine.step() if o.finished)
    assert forward[0] == 10 + 4 * 7  # vs 4 x 10 for four prefills
    assert [outs[j].token_ids for j in range(4)] == [hf_greedy(path, p, 8)] * 4
    assert engine.pool.stats().used_blocks == 0


def test_n_choices_seeded_and_when_the_pool_cannot_copy(tiny_models):
    """Choice 0 of a seeded request draws what n=1 draws, the others their own; a choice whose
    fork finds no block for its copy waits and recomputes the prompt, with the same answer."""
    path = str(tiny_models["llama-mha"])
    p = prompts(18, [10])[0]
    llm = LLM(path, device="cpu", num_blocks=96, block_size=4)
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    one = llm.generate([p], seeded)[0].token_ids
    many = [o.token_ids for o in llm.generate([p], SamplingParams(
        max_tokens=8, temperature=1.0, seed=11, ignore_eos=True, n=3))]
    assert many[0] == one and len({tuple(t) for t in many}) == 3
    tight = LLMEngine(EngineConfig(model=path, device="cpu", num_blocks=3, block_size=4))
    tight.add_request(p, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, n=2), "r")
    tight.step()  # the prompt fills the pool: choice 1 waits
    assert [s.index for s in tight.scheduler.waiting] == [1]
    outs = {}
    while tight.has_unfinished_requests():
        outs.update((o.index, o.token_ids) for o in tight.step() if o.finished)
    assert outs == {0: hf_greedy(path, p, 2), 1: hf_greedy(path, p, 2)}
    assert tight.pool.stats().used_blocks == 0


def test_aborting_a_request_of_n_choices_frees_every_block(tiny_models):
    engine = LLMEngine(EngineConfig(model=str(tiny_models["bloom"]), device="cpu", num_blocks=64,
                                    block_size=4))
    engine.add_request(prompts(19, [9])[0], SamplingParams(max_tokens=20, n=3, ignore_eos=True),
                       "r")
    for _ in range(3):
        engine.step()
    assert len(engine.scheduler.running) == 3 and engine.pool.stats().used_blocks > 0
    assert engine.abort_request("r") and not engine.has_unfinished_requests()
    assert engine.pool.stats().used_blocks == 0 and not engine.scheduler.has_work()
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine.add_request([5, 6], SamplingParams(n=engine.scheduler.max_num_seqs + 1))
