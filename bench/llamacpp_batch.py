"""llama.cpp serving a workload with continuous batching, through ``llama-cpp-python``'s C API,
for bench/throughput_cpu_quant.py (its docstring says why the low-level API and one KV stream per
sequence): greedy argmax over the returned logits, the tokens and decode or wall seconds back."""

from __future__ import annotations

import os
import time
from collections import deque

from bench.throughput import version


def run_llamacpp(w: dict, mode: str) -> dict:
    """Continuous batching through llama.cpp's C API (module docstring)."""
    import llama_cpp
    import numpy as np
    if mode == "throughput":
        prompts, caps, parallel = w["prompts"], w["max_tokens"], w["llamacpp_parallel"]
    else:
        prompts, parallel = w["single_prompts"], 1
        caps = [w["single_tokens"]] * len(prompts)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(w["gguf"].encode(),
                                                 llama_cpp.llama_model_default_params())
    cp = llama_cpp.llama_context_default_params()
    longest = max(len(p) + c for p, c in zip(prompts, caps))
    cp.n_ctx = parallel * longest
    cp.n_batch = cp.n_ubatch = w["batch_tokens"]
    cp.n_seq_max, cp.kv_unified = parallel, False  # a KV stream per sequence
    cp.flash_attn_type = 1  # enabled: 1.1-1.2x auto's decode steps here
    cp.n_threads = cp.n_threads_batch = len(os.sched_getaffinity(0))
    ctx = llama_cpp.llama_init_from_model(model, cp)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    memory = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(w["batch_tokens"], 0, 1)

    def run(order: list[int]) -> tuple[list[list[int]], list[float]]:
        queue, free = deque(order), list(range(parallel))
        running: dict[int, dict] = {}                      # seq id -> request state
        out: list[list[int]] = [[] for _ in prompts]
        firsts: list[float] = [0.0] * len(prompts)
        while queue or running:
            while queue and free:
                i = queue.popleft()
                running[free.pop()] = {"req": i, "fed": 0}
            n, sampled = 0, []
            for seq, st in running.items():                  # decoding sequences first
                if st["fed"] == len(prompts[st["req"]]):
                    pos = len(prompts[st["req"]]) + len(out[st["req"]]) - 1
                    n = _put(batch, n, out[st["req"]][-1], pos, seq, True)
                    sampled.append((n - 1, seq))
            for seq, st in running.items():                  # then prompt chunks
                prompt = prompts[st["req"]]
                while st["fed"] < len(prompt) and n < w["batch_tokens"]:
                    last = st["fed"] == len(prompt) - 1
                    n = _put(batch, n, prompt[st["fed"]], st["fed"], seq, last)
                    st["fed"] += 1
                    if last:
                        sampled.append((n - 1, seq))
            batch.n_tokens = n
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            now = time.perf_counter()
            for index, seq in sampled:
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index),
                                               shape=(n_vocab,))
                req = running[seq]["req"]
                out[req].append(int(logits.argmax()))
                if len(out[req]) == 1:
                    firsts[req] = now
                if len(out[req]) == caps[req]:
                    llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
                    del running[seq]
                    free.append(seq)
                    firsts[req] = now - firsts[req]          # decode seconds
        return out, firsts

    run([0])  # warm-up: the first request alone
    llama_cpp.llama_memory_clear(memory, True)
    t0 = time.perf_counter()
    tokens, decode = run(list(range(len(prompts))))
    elapsed = time.perf_counter() - t0
    result = {"token_ids": tokens, "llama_cpp_python": version("llama_cpp_python"),
              "llama_cpp_system": llama_cpp.llama_print_system_info().decode().strip(),
              "parallel": parallel, "threads": cp.n_threads}
    result.update({"elapsed_s": elapsed} if mode == "throughput" else {"decode_s": sum(decode)})
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return result


def _put(batch, n: int, token: int, pos: int, seq: int, logits: bool) -> int:
    batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
    batch.seq_id[n][0], batch.logits[n] = seq, logits
    return n + 1
