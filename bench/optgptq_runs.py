"""This engine on the workloads of bench/throughput_cpu_quant.py: the throughput workload's wall
time, one stream's decode time, and where that stream's decode step goes (:func:`step_breakdown`:
the native ops, the output head, and the rest: Python, scheduling, sampling)."""

from __future__ import annotations

import time


def run_optgptq(model: str, w: dict, mode: str) -> dict:
    from optgptq.engine.llm import LLM
    from optgptq.engine.sampling_params import SamplingParams
    llm = LLM(model, max_num_seqs=64, max_num_batched_tokens=w["batch_tokens"])
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    if mode == "throughput":
        params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True)
                  for m in w["max_tokens"]]
        t0 = time.perf_counter()
        outs = llm.generate(w["prompts"], params)
        return {"elapsed_s": time.perf_counter() - t0,
                "token_ids": [list(o.token_ids) for o in outs]}
    engine, tokens, decode_s = llm.engine, [], 0.0
    params = SamplingParams(max_tokens=w["single_tokens"], temperature=0, ignore_eos=True)
    for prompt in w["single_prompts"]:
        engine.add_request(prompt, params, stream=True)
        first = None
        while engine.has_unfinished_requests():
            outs = engine.step()
            if first is None and outs:
                first = time.perf_counter()
            if outs and outs[0].finished:
                tokens.append(list(outs[0].token_ids))
        decode_s += time.perf_counter() - first
    return {"decode_s": decode_s, "token_ids": tokens,
            "step_breakdown": step_breakdown(engine, w["single_prompts"][-1])}


def step_breakdown(engine, prompt: list[int], steps: int = 48) -> dict:
    """Where a single stream's decode step goes, after the timed passes: ``steps`` steps of
    ``prompt`` under torch's profiler (its own cost included in ``step_ms``), each native op's
    wall time on the calling thread (its OpenMP workers' time is inside it), the output head
    apart; ``rest_ms``: the step outside native ops (Python, the scheduler, the sampler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from optgptq.engine.sampling_params import SamplingParams
    model = engine.runner.model
    logits = model.compute_logits

    def head(hidden):
        with record_function("output_head"):
            return logits(hidden)

    model.compute_logits = head
    engine.add_request(prompt, SamplingParams(max_tokens=steps + 2, temperature=0,
                                              ignore_eos=True))
    engine.step()
    engine.step()  # the prompt's prefill and a first decode step outside the window
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - t0) / steps * 1e3
    while engine.has_unfinished_requests():
        engine.step()
    model.compute_logits = logits
    ms = {e.key: e.cpu_time_total / steps / 1e3 for e in prof.key_averages()}
    native = {k.split("::")[1]: v for k, v in ms.items() if k.startswith("optgptq_cpu::")}
    head_ms = ms.get("output_head", 0.0)
    linear = "gptq_packed_linear" if "gptq_packed_linear" in native else "packed_linear"
    native[linear] -= head_ms  # the head's product is one of these calls
    out = {"step_ms": wall, "output_head_ms": head_ms, "threads": torch.get_num_threads(),
           **{f"{k}_ms": v for k, v in sorted(native.items(), key=lambda kv: -kv[1])}}
    out["rest_ms"] = wall - head_ms - sum(native.values())
    return out
