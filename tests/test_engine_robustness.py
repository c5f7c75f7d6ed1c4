"""Bad input gets clear errors; random traffic with aborts leaves the pool clean; async streaming."""

import asyncio
import random
import time

import pytest
import torch

from optgptq.config import EngineConfig
from optgptq.engine.async_engine import AsyncLLMEngine
from optgptq.engine.llm import LLM
from optgptq.engine.llm_engine import LLMEngine
from optgptq.engine.sampler import Sampler
from optgptq.engine.sampling_params import SamplingParams
from optgptq.engine.sequence import Sequence
from optgptq.models.hub import resolve_model
from tests.conftest import poison_rows, random_prompt


@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"top_k": 1.5}, "top_k"), ({"stop": [""]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    ({"block_size": 0}, "block_size"), ({"kv_cache_memory_fraction": 1.5}, "kv_cache_memory_fraction"),
    ({"dtype": "int3"}, "dtype"), ({"device": "tpu"}, "device"), ({"max_num_seqs": -1}, "max_num_seqs"),
])
def test_bad_engine_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)


def test_engine_config_from_yaml(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("engine:\n  block_size: 32\n  max_num_seqs: 8\n")
    cfg = EngineConfig.from_yaml(good)
    assert (cfg.block_size, cfg.max_num_seqs, cfg.model) == (32, 8, "smollm2")
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  blok_size: 32\n")
    with pytest.raises(ValueError, match="blok_size"):
        EngineConfig.from_yaml(bad)
    bad.write_text("engine:\n  block_size: -4\n")
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig.from_yaml(bad)


def test_unknown_model_and_architecture(tmp_path):
    with pytest.raises(ValueError, match="no model hub access"):
        resolve_model("meta-llama/Llama-3-8B")
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported"):
        EngineConfig(model=str(tmp_path)) and LLMEngine(EngineConfig(model=str(tmp_path)))


def test_requests_that_cannot_fit_are_rejected(tiny_models):
    engine = LLMEngine(EngineConfig(model=str(tiny_models["llama-mha"]), device="cpu", num_blocks=8, block_size=4))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(list(range(100, 612)))                 # context is 512
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request(list(range(100, 110)), SamplingParams(max_tokens=600))
    with pytest.raises(ValueError, match="KV blocks"):             # 8 blocks x 4 tokens = 32
        engine.add_request(list(range(100, 130)), SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([1, 2, 10**9])
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([])
    assert not engine.has_unfinished_requests()


def test_pool_invariants_after_random_traffic_with_aborts(tiny_models):
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    engine = LLMEngine(EngineConfig(model=str(tiny_models["llama-gqa"]), device="cpu", num_blocks=40,
                                    block_size=4, max_num_batched_tokens=24))
    shared = random_prompt(g, 12)
    live, finished = [], 0
    for step in range(150):
        if rng.random() < 0.4:
            body = shared[:rng.randint(0, 12)] + random_prompt(g, rng.randint(1, 20))
            params = SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0, 0.8]),
                                    ignore_eos=True)
            live.append(engine.add_request(body, params))
        if live and rng.random() < 0.15:
            engine.abort_request(live.pop(rng.randrange(len(live))))
        for out in engine.step():
            if out.finished:
                live.remove(out.request_id)
                finished += 1
        used = engine.pool.stats().used_blocks
        held = sum(len(s.block_table) for s in engine.scheduler.running)
        assert used <= held  # shared prefix blocks are held by several sequences
    while engine.has_unfinished_requests():
        engine.step()
    stats = engine.pool.stats()
    assert finished > 10 and stats.prefix_hit_tokens > 0
    assert stats.used_blocks == 0 and stats.free_blocks == stats.num_blocks
    assert all(b.ref_count == 0 for b in engine.pool.blocks)


async def _until_idle(engine) -> None:
    """Wait (up to 5 s) until the engine's pool has no block in use and nothing waits."""
    for _ in range(100):
        stats = engine.stats()
        if stats.pool.used_blocks == 0 and stats.waiting == 0:
            return
        await asyncio.sleep(0.05)


def test_async_engine_streams_aborts_and_survives_bad_requests(tiny_models):
    path = str(tiny_models["llama-mha"])
    engine = AsyncLLMEngine(EngineConfig(model=path, device="cpu", num_blocks=64, block_size=4))
    g = torch.Generator().manual_seed(11)
    prompt = random_prompt(g, 9)
    expected = LLM(path, device="cpu", num_blocks=64, block_size=4).generate(
        [prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]

    async def consume(params, stop_after=None):
        ids = []
        async for out in engine.generate(prompt, params):
            ids.extend(out.delta_token_ids)
            if stop_after is not None and len(ids) >= stop_after:
                break
        return ids

    async def main():
        greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        with pytest.raises(ValueError, match="max_model_len"):
            await consume(SamplingParams(max_tokens=10_000))
        full, partial = await asyncio.gather(consume(greedy), consume(greedy, stop_after=3))
        assert full == expected.token_ids and partial == expected.token_ids[:3]
        await _until_idle(engine)  # the abandoned stream's blocks come back
        assert engine.stats().pool.used_blocks == 0

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_engine_core_in_a_child_process_streams_what_the_engine_computes(tiny_models):
    path = str(tiny_models["llama-gqa"])
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    prompts = [random_prompt(g, n) for n in (5, 17, 33)]
    greedy = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(path, device="cpu", num_blocks=64).generate(prompts,
                                                                                    greedy)]
    engine = AsyncLLMEngine(EngineConfig(model=path, device="cpu", num_blocks=64),
                            record_cache_events=True, process=True)
    assert engine.model_info()["num_blocks"] == 64
    assert set(engine.model_info()["startup"]) >= {"process_s", "load_s"}

    async def consume(prompt, stop_after=None):
        outs = []
        async for out in engine.generate(prompt, greedy):
            outs.append(out)
            if stop_after is not None and len(out.token_ids) >= stop_after:
                break
        return outs

    async def main():
        runs = await asyncio.gather(*[consume(p) for p in prompts], consume(prompts[0], 2))
        for outs, want in zip(runs, expected):
            assert outs[-1].token_ids == want and outs[-1].finished
            assert sum(len(o.delta_token_ids) for o in outs) == len(want)
        with pytest.raises(ValueError, match="max_model_len"):
            await consume([1] * 600)
        await _until_idle(engine)  # the abandoned stream's blocks come back
        assert engine.stats().pool.used_blocks == 0 and engine.stats().waiting == 0
        assert any(kind == "add" for kind, _ in engine.drain_cache_events())
        # the child dies: what is in flight fails, and so does what comes after
        long = engine.generate([7] * 20, SamplingParams(max_tokens=450, ignore_eos=True))
        await long.__anext__()
        engine._process.proc.kill()
        with pytest.raises(RuntimeError, match="engine process died"):
            async for _ in long:
                pass
        assert not engine.alive
        with pytest.raises(RuntimeError, match="died"):
            await consume(prompts[0])

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_synthetic_core_streams_its_phrase_and_honours_stops(tiny_models):
    from optgptq.engine.synthetic_core import PHRASE, SyntheticCore

    config = EngineConfig(model=str(tiny_models["llama-gqa"]), num_blocks=8, block_size=16,
                          max_num_seqs=2)
    core = SyntheticCore(config, step_time_s=0.0)  # every token at once
    core.add_request([5] * 10, SamplingParams(max_tokens=6), "a")
    core.add_request([5] * 10, SamplingParams(max_tokens=50, stop=["brown"]), "b")
    core.add_request([5] * 10, SamplingParams(max_tokens=3), "c")  # waits: two seqs at most
    outs = {o.request_id: o for o in core.step()}
    assert set(outs) == {"a", "b"} and all(o.finished for o in outs.values())
    assert len(outs["a"].token_ids) == 6 and outs["a"].finish_reason == "length"
    assert outs["b"].finish_reason == "stop" and outs["b"].text == PHRASE[:PHRASE.index("brown")]
    assert PHRASE.startswith(outs["a"].text)
    assert [o.request_id for o in core.step()] == ["c"] and not core.has_unfinished_requests()
    with pytest.raises(ValueError, match="KV blocks"):
        core.add_request([5] * 10, SamplingParams(max_tokens=200), "d")
    stepped = SyntheticCore(config, step_time_s=0.01)  # one token per request per step
    stepped.add_request([5] * 4, SamplingParams(max_tokens=3), "e")
    lens = [len(stepped.step()[0].token_ids) for _ in range(3)]
    assert lens == [1, 2, 3] and stepped.stats().pool.used_blocks == 0


def _rows(sampler: Sampler, specs: list[tuple[SamplingParams, int | None]]) -> list[Sequence]:
    seqs = [Sequence(f"s{i}", [1], params, i, 4) for i, (params, _) in enumerate(specs)]
    for seq, (_, seed) in zip(seqs, specs):
        if seed is not None:
            seq.generator = sampler.generator_for(seed)
    return seqs


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("bad_value", [float("nan"), float("-inf")])  # not a number; no mass
def test_sampler_fails_only_the_row_it_cannot_sample(bad_value, device):
    """Row 1 cannot be sampled: it gets -1 and draws nothing; rows 0 and 2 get what they get
    without it (their generators, seeded or shared, advance as if it were absent). Logprobs: None
    unless a row asks; else one per row, a float only for a row that asked and got a token."""
    logits = (torch.randn(3, 64, generator=torch.Generator().manual_seed(3)) * 2).to(device)
    logits[1] = bad_value
    hot, hot_lp = SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, logprobs=True)
    greedy_lp = SamplingParams(temperature=0, logprobs=True)
    cases = [  # (params, seed) per row; the logprobs pattern expected
        ([(hot, 1), (hot, 2), (hot, 3)], None),
        ([(hot, None), (hot, None), (hot, None)], None),
        ([(greedy_lp, None), (hot_lp, 2), (hot, 3)], [float, None, None]),
        ([(hot, 1), (hot_lp, None), (hot_lp, None)], [None, None, float]),
    ]
    for specs, pattern in cases:
        sampler = Sampler(torch.device(device), seed=0)
        seqs = _rows(sampler, specs)
        tokens, logprobs, _ = sampler(logits, seqs)
        ref = Sampler(torch.device(device), seed=0)
        alone = _rows(ref, [specs[0], specs[2]])
        ref_tokens = ref(logits[[0, 2]], alone).tokens
        assert tokens == [ref_tokens[0], -1, ref_tokens[1]], specs
        assert torch.equal(sampler.generator.get_state(), ref.generator.get_state())
        for seq, ref_seq in zip([seqs[0], seqs[2]], alone):
            if seq.generator is not None:
                assert torch.equal(seq.generator.get_state(), ref_seq.generator.get_state())
        if pattern is None:
            assert logprobs is None
        else:
            assert [type(v) if v is not None else None for v in logprobs] == pattern
            for i, v in enumerate(logprobs):
                if v is not None:
                    assert v == pytest.approx(torch.log_softmax(logits[i], -1)[tokens[i]].item())
    sampler = Sampler(torch.device(device), seed=0)  # a bad row alone: no error either
    assert sampler(logits[1:2], _rows(sampler, [(hot_lp, None)])) == ([-1], [None], None)


def test_async_engine_fails_the_request_that_cannot_be_sampled_alone(tiny_models, monkeypatch):
    """Through the core loop (as the serving replicas run it): the bad request's stream raises,
    the others in its batch complete with the tokens they get without it, the loop goes on."""
    path = str(tiny_models["llama-gqa"])
    g = torch.Generator().manual_seed(21)
    good = [random_prompt(g, n) for n in (6, 15, 9)]
    bad_prompt = random_prompt(g, 11)
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(path, device="cpu", num_blocks=64, block_size=4)
                .generate(good, greedy)]
    poison_rows(monkeypatch, lambda seq: seq.token_ids[:seq.num_prompt_tokens] == bad_prompt)
    engine = AsyncLLMEngine(EngineConfig(model=path, device="cpu", num_blocks=64, block_size=4))

    async def consume(prompt, params):
        ids = []
        async for out in engine.generate(prompt, params):
            ids.extend(out.delta_token_ids)
        return ids

    async def main():
        bad = SamplingParams(max_tokens=10, temperature=0.7, ignore_eos=True)
        runs = await asyncio.gather(*[consume(p, greedy) for p in good], consume(bad_prompt, bad),
                                    return_exceptions=True)
        assert runs[:3] == expected
        assert isinstance(runs[3], RuntimeError) and "sampling failed" in str(runs[3])
        assert await consume(good[0], greedy) == expected[0]  # the loop goes on
        await _until_idle(engine)
        assert engine.stats().pool.used_blocks == 0

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_core_loop_reports_each_failed_request_once(tiny_models):
    """A request the core failed alone in a step that then raised gets one error, not two."""
    from optgptq.engine import core_loop
    from optgptq.engine.synthetic_core import SyntheticCore

    class Core(SyntheticCore):
        def step(self):
            self.abort_request("a")
            self.failures = [("a", "sampling failed")]
            raise RuntimeError("boom")

        def take_failures(self):
            failures, self.failures = getattr(self, "failures", []), []
            return failures

    core = Core(EngineConfig(model=str(tiny_models["llama-gqa"]), num_blocks=8, block_size=16))
    inbox = [[("add", "a", [5] * 4, SamplingParams()), ("add", "b", [5] * 4, SamplingParams())],
             [("stop",)]]
    batches = []
    core_loop.run(core, lambda block: inbox.pop(0), batches.append)
    errors = [e for batch in batches for e in batch[2]]
    assert sorted(errors) == [("a", "failed", "engine step failed: boom", None),
                              ("b", "failed", "engine step failed: boom", None)]


def test_core_loop_accepts_before_it_steps(tiny_models):
    """Acceptance goes out as soon as the request is taken: a client's wait for its status does
    not include the step (a prefill of seconds on a busy CPU)."""
    from optgptq.engine import core_loop
    from optgptq.engine.synthetic_core import SyntheticCore

    emitted = []

    class Core(SyntheticCore):
        def step(self):
            emitted.append("step")
            return super().step()

    core = Core(EngineConfig(model=str(tiny_models["llama-gqa"]), num_blocks=8, block_size=16))
    inbox = [[("add", "a", [5] * 4, SamplingParams(max_tokens=2))], [("stop",)]]
    core_loop.run(core, lambda block: inbox.pop(0), emitted.append)
    first = emitted[0]
    assert first[0] == ["a"] and first[1] == [] and emitted[1] == "step"
    assert any(d[0] == "a" for batch in emitted[2:] if batch != "step" for d in batch[1])


def test_async_engine_answers_token_prompts_without_waiting_for_the_step(tiny_models):
    """A token-id prompt is checked against the core's limits on submission: accepted, or
    refused naming its field, while the core is still inside a long step; the core's own check
    is the same one, so what was accepted is served."""
    from optgptq.engine.sequence import InvalidRequest

    engine = AsyncLLMEngine(EngineConfig(model=str(tiny_models["llama-gqa"]), num_blocks=16,
                                         block_size=4), core="synthetic",
                            core_options={"step_time_s": 0.5})
    limits = engine.model_info()["limits"]
    rng = random.Random(7)

    async def main():
        busy = engine.submit([rng.randrange(limits.vocab_size) for _ in range(5)],
                             SamplingParams(max_tokens=3, ignore_eos=True), "busy", lambda d: None)
        await busy.accepted
        await asyncio.sleep(0.1)                     # the core is now inside a 0.5 s step
        t0 = time.monotonic()
        ok = engine.submit([rng.randrange(limits.vocab_size)], SamplingParams(max_tokens=2),
                           "ok", lambda d: None)
        too_long = engine.submit([1, 2], SamplingParams(max_tokens=limits.max_model_len),
                                 "too-long", lambda d: None)
        bad_id = engine.submit([limits.vocab_size + rng.randrange(9)], SamplingParams(),
                               "bad-id", lambda d: None)
        await ok.accepted
        for sub, param in ((too_long, "max_tokens"), (bad_id, "prompt")):
            with pytest.raises(InvalidRequest) as err:
                await sub.accepted
            assert err.value.param == param
        assert time.monotonic() - t0 < 0.2           # none waited for the step to end
        await asyncio.gather(busy.done, ok.done)     # and the accepted ones are served

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_async_engine_streams_n_choices_and_aborts_them_all(tiny_models):
    """Through the core loop: each choice's deltas name it, its first carries the prompt, its
    tokens and top logprobs match the offline engine's; aborting the request frees every
    choice's blocks."""
    path = str(tiny_models["llama-gqa"])
    p = random_prompt(torch.Generator().manual_seed(22), 9)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, n=3, logprobs=True,
                            top_logprobs=2)
    expected = LLM(path, device="cpu", num_blocks=64, block_size=4).generate([p], params)
    engine = AsyncLLMEngine(EngineConfig(model=path, device="cpu", num_blocks=64, block_size=4))

    async def main():
        final = {}
        async for out in engine.generate(p, params):
            final[out.index] = out
        assert [final[j].token_ids for j in range(3)] == [o.token_ids for o in expected]
        for j in range(3):
            assert [[i for i, _ in t] for t in final[j].top_logprobs] == \
                [[i for i, _ in t] for t in expected[j].top_logprobs]
        deltas = []
        sub = engine.submit(p, SamplingParams(max_tokens=100, n=3, ignore_eos=True), "x",
                            deltas.append)
        await sub.accepted
        while len({d[10] for d in deltas}) < 3:
            await asyncio.sleep(0.01)
        engine.abort("x")
        await _until_idle(engine)
        assert engine.stats().pool.used_blocks == 0 and not sub.done.done()
        firsts = [d[10] for d in deltas if d[7] is not None]
        assert sorted(firsts) == [0, 1, 2] and all(d[7] == p for d in deltas if d[7])

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
