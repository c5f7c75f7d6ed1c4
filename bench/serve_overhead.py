"""What the serving layer costs: the same requests through the engine alone and through Serve.

Paths, each at ``--concurrency`` (default 1,16,64,256) closed-loop streams of ``--requests``
(default max(8, 2 x concurrency)) requests, each a prompt of exactly ``--prompt-tokens`` tokens
(distinct random English words, so no prefix is shared) and ``--max-tokens`` greedy output
tokens with EOS ignored:

- ``engine``: the engine alone, :class:`~optgptq.engine.async_engine.AsyncLLMEngine` streaming
  in this process (its core in a child process, as in a replica);
- ``http-stream``, ``http-unary``, ``grpc-stream``: the deployment of deployments/app.py (one
  engine replica, ``--ingress`` ingress replicas), through its OpenAI HTTP API (server-sent
  events, or one JSON body) and its gRPC ``GenerateStream``;
- ``ceiling``: the same deployment with ``backend: synthetic`` (no model; every request's tokens
  at once): what the serving path itself can pass, HTTP streaming;
- ``serve-floor``: Ray Serve's own floor, a one-replica FastAPI deployment that answers at once,
  behind Serve's HTTP proxy (``--floor-requests`` sequential POSTs);
- ``engine_beside_idle_serve`` (``--beside``, default on CPU): the engine alone again while the
  deployment sits idle: on a machine with few cores, the slowdown that Ray's and Serve's own
  processes cause the engine by sharing its cores, whatever the request path does.

Clients are ``--clients`` processes (bench/load_client.py), released together. Per path and
concurrency: output tok/s (output tokens / wall time from the first send to the last answer),
time to first token and inter-chunk latency p50/p99, errors. Before timing, the engine alone
runs every level once with 8 output tokens (kernels compiled for every batch shape, as the
Serve paths find them after it), and each path's outputs are checked: every request must end
with ``finish_reason: length`` and its output tokens (engine and gRPC: counted; HTTP: the usage
of the unary path, the chunk texts of the streamed one), and ``--check`` prompts per path must
give the engine's greedy text exactly. Startup: seconds from deploying the app to its first
answer, twice (cold, then warm: compiled kernels cached), with the engine's own breakdown. The
results file is written after the Serve paths and again at the end.

Models: ``--model`` (a folder, or ``smollm2``) or ``--shape llama3-8b`` (Llama-3-8B's shape with
random weights, ``load_format: dummy``, and the default model's tokenizer, the vocabulary
matched). Results: ``--out`` (default bench/results/serve-overhead-<cpu|gpu>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from load_client import prompts, run_clients, summary  # noqa: E402

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
             "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
             "bos_token_id": 1, "eos_token_id": 2}


# -- requests ------------------------------------------------------------------------------
def shaped_model(shape: str, folder: Path) -> Path:
    """A config-only folder of ``shape`` with the default model's tokenizer (vocab matched)."""
    from transformers import AutoTokenizer

    from optgptq.models.hub import default_tokenizer_path

    assert shape == "llama3-8b", shape
    tokenizer = AutoTokenizer.from_pretrained(str(default_tokenizer_path()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**LLAMA3_8B,
                                                    "vocab_size": len(tokenizer)}))
    tokenizer.save_pretrained(str(folder))
    return folder


# -- the engine alone ----------------------------------------------------------------------------
async def _engine_level(engine, tokenizer, texts: list[str], concurrency: int,
                        max_tokens: int) -> tuple[list, float]:
    from optgptq.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    queue, out = list(texts), []

    async def loop():
        while queue:
            text = queue.pop()
            ids = tokenizer.encode(text, add_special_tokens=True)
            t0 = last = time.perf_counter()
            rec = {"gaps": [], "tokens": 0, "prompt": text, "error": None}
            async for o in engine.generate(ids, params):
                now = time.perf_counter()
                if o.delta_text or o.finished:
                    if "ttft" not in rec:
                        rec["ttft"] = now - t0
                    else:
                        rec["gaps"].append(now - last)
                    last = now
                rec["tokens"] += len(o.delta_token_ids)
                rec["text"], rec["finish_reason"] = o.text, o.finish_reason
            out.append(rec)

    t0 = time.perf_counter()
    await asyncio.gather(*[loop() for _ in range(concurrency)])
    return out, time.perf_counter() - t0


def run_engine(args, config, tokenizer, levels, checks) -> tuple[dict, dict, dict]:
    """The engine alone: per-level summaries, the check prompts' texts, its startup."""
    from optgptq.engine.async_engine import AsyncLLMEngine

    t0 = time.perf_counter()
    engine = AsyncLLMEngine(config, process=True)
    startup = {"total_s": time.perf_counter() - t0, **engine.model_info().get("startup", {})}
    try:
        async def main():
            for c, level_texts in levels.items():  # warm-up: every batch shape compiled
                await _engine_level(engine, tokenizer, level_texts[:c], c, 8)
            texts, _ = await _engine_level(engine, tokenizer, checks, 1, args.max_tokens)
            out = {}
            for c, level_texts in levels.items():
                records, wall = await _engine_level(engine, tokenizer, level_texts, c,
                                                    args.max_tokens)
                out[c] = summary(records, wall, args.max_tokens)
                print(f"engine       c={c:<4d} {_line(out[c])}", flush=True)
            return out, {r["prompt"]: r["text"] for r in texts}

        results, check_texts = asyncio.run(main())
    finally:
        engine.shutdown()
    return results, check_texts, startup


def _line(s: dict) -> str:
    return (f"{s['output_tok_s']:9.1f} tok/s  ttft p50 {s['ttft_p50_ms'] or 0:8.1f} ms  "
            f"itl p50 {s['itl_p50_ms'] or 0:7.2f} ms  chunks/req {s['chunks_per_request']:.1f}  "
            f"errors {s['errors']} bad {s['bad_outputs']}")


# -- Serve ---------------------------------------------------------------------------------------
def app_args(args, model: str, engine: dict, ports, backend: str = "native") -> dict:
    return {"model": model, "served_model_name": "bench", "backend": backend,
            "engine": engine,
            **({"synthetic": {"step_time_s": 0.0}} if backend == "synthetic" else {}),
            "replicas": {"num_replicas": 1, "max_ongoing_requests": max(args.concurrency),
                         "max_queued_requests": 4 * max(args.concurrency),
                         "max_waiting": 4 * max(args.concurrency),
                         # the engine's threads: as many as the engine alone had
                         **({"num_gpus": 1} if args.gpu and backend != "synthetic" else
                            {"num_cpus": os.cpu_count()})},
            "router": {"policy": args.policy},
            "ingress": {"num_replicas": args.ingress, "http_port": ports[0],
                        "grpc_port": ports[1], "num_cpus": 0}}


def deploy_timed(args_dict: dict, ports) -> float:
    """Deploy and wait for the first answer; seconds."""
    import urllib.request

    from deployments.app import deploy

    t0 = time.perf_counter()
    deploy(args_dict)
    body = json.dumps({"model": "bench", "prompt": "Hello", "max_tokens": 1}).encode()
    while True:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{ports[0]}/v1/completions", body,
                                         {"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=60).read()
            return time.perf_counter() - t0
        except OSError:
            time.sleep(0.05)


def serve_paths(args, ports, levels: dict, checks: dict, modes) -> tuple[dict, dict]:
    """Each mode: its check prompts, then every level; summaries and check texts."""
    out, texts = {}, {}
    for mode in modes:
        records = run_clients(mode, checks[mode], 1, args, ports)[0] if checks[mode] else []
        texts[mode] = {r["prompt"]: r.get("text") for r in records}
        for c, level_texts in levels[mode].items():
            records, wall = run_clients(mode, level_texts, c, args, ports)
            out.setdefault(mode, {})[c] = summary(records, wall, args.max_tokens)
            print(f"{mode:12s} c={c:<4d} {_line(out[mode][c])}", flush=True)
    return out, texts


def serve_floor(args, port: int) -> dict:
    """Ray Serve's own floor: a FastAPI deployment that answers at once, behind Serve's proxy."""
    import urllib.request

    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class Floor:
        @app.post("/v1/completions")
        def complete(self) -> dict:
            return {"choices": [{"text": "x", "finish_reason": "length"}]}

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Floor.bind(), name="floor", route_prefix="/")
    times = []
    for i in range(args.floor_requests + 10):
        t0 = time.perf_counter()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", b"{}",
                                     {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=60).read()
        if i >= 10:
            times.append(time.perf_counter() - t0)
    serve.delete("floor")
    times.sort()
    return {"requests": len(times), "p50_ms": times[len(times) // 2] * 1e3,
            "p99_ms": times[int(0.99 * len(times))] * 1e3}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- main -----------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--shape", choices=["llama3-8b"], help="random weights of this shape")
    p.add_argument("--concurrency", default="1,16,64,256")
    p.add_argument("--requests", type=int, default=None, help="per level (default 2 x c, >= 8)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--check", type=int, default=3, help="greedy-equality prompts per path")
    p.add_argument("--modes", default="http-stream,http-unary,grpc-stream")
    p.add_argument("--ingress", type=int, default=1, help="ingress replicas")
    p.add_argument("--clients", type=int, default=2, help="client processes")
    p.add_argument("--policy", default="prefix_aware")
    p.add_argument("--engine", default="{}", help="extra engine settings (JSON)")
    p.add_argument("--floor-requests", type=int, default=200)
    p.add_argument("--skip-ceiling", action="store_true")
    p.add_argument("--beside", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the engine alone beside the idle deployment (default: on "
                        "CPU, where Ray's own processes share the engine's cores)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import ray
    import torch
    from ray import serve
    from transformers import AutoTokenizer

    import report
    from optgptq.config import EngineConfig
    from optgptq.models.hub import resolve_model

    args.gpu = torch.cuda.is_available()
    if args.beside is None:
        args.beside = not args.gpu
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    modes = args.modes.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="serve-overhead-"))
    model = str(shaped_model(args.shape, tmp / args.shape) if args.shape
                else resolve_model(args.model))
    engine = {"device": "cuda" if args.gpu else "cpu",
              "max_num_seqs": max(args.concurrency), "max_num_batched_tokens": 2048,
              **({"load_format": "dummy"} if args.shape else {}),
              **({"kv_cache_bytes": 24 << 30} if args.gpu else {"kv_cache_bytes": 4 << 30}),
              **json.loads(args.engine)}
    tokenizer = AutoTokenizer.from_pretrained(model)
    paths = ["engine", *modes, "ceiling"]
    seed = iter(range(1000, 100000, 97))
    levels = {m: {c: prompts(tokenizer, args.requests or max(8, 2 * c), args.prompt_tokens,
                             next(seed)) for c in args.concurrency} for m in paths}
    checks = {m: prompts(tokenizer, args.check, args.prompt_tokens, next(seed)) for m in paths}

    results: dict = {"model": args.shape or args.model, "engine_settings": engine}
    print("engine alone", flush=True)
    config = EngineConfig(model=model, **engine)
    all_checks = [t for m in modes for t in checks[m]]
    results["engine"], engine_texts, results["engine_startup"] = run_engine(
        args, config, tokenizer, levels["engine"], all_checks)

    ports = (free_port(), free_port())
    path = os.pathsep.join(x for x in [str(ROOT), os.environ.get("PYTHONPATH")] if x)
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        startup = []
        for attempt in ("cold", "warm"):
            if attempt == "warm":
                serve.delete("optgptq")
            seconds = deploy_timed(app_args(args, model, engine, ports), ports)
            handle = serve.get_deployment_handle("EngineReplica", "optgptq")
            startup.append({"attempt": attempt, "first_answer_s": seconds,
                            "engine": handle.model_info.remote().result().get("startup")})
            print(f"startup ({attempt}): {seconds:.1f} s", flush=True)
        results["startup"] = startup
        results["serve"], serve_texts = serve_paths(args, ports, levels, checks, modes)
        if args.beside:  # the engine alone again, with the deployment idle beside it
            print("engine alone, the deployment idle beside it", flush=True)
            results["engine_beside_idle_serve"], _, _ = run_engine(
                args, config, tokenizer, levels["engine"], all_checks[:1])
        serve.delete("optgptq")
        results["checks"] = {m: {"prompts": len(serve_texts[m]),
                                 "equal": sum(engine_texts.get(t) == v
                                              for t, v in serve_texts[m].items())}
                             for m in modes}
        print(f"greedy checks (equal / prompts): {results['checks']}", flush=True)
        write(args, results, report)
        if not args.skip_ceiling:
            deploy_timed(app_args(args, model, engine, ports, backend="synthetic"), ports)
            ceiling, _ = serve_paths(args, ports, {"http-stream": levels["ceiling"]},
                                     {"http-stream": []}, ["http-stream"])
            results["ceiling"] = ceiling["http-stream"]
            serve.delete("optgptq")
        serve.shutdown()
        write(args, results, report)
        results["serve_floor"] = serve_floor(args, free_port())
        print(f"Serve's floor: {results['serve_floor']}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    write(args, results, report)


def write(args, results: dict, report) -> None:
    import importlib.metadata as md
    import platform

    eng, http = results["engine"], results["serve"]["http-stream"]
    results["http_stream_over_engine"] = {
        c: http[c]["output_tok_s"] / eng[c]["output_tok_s"] for c in eng if c in http}
    if "engine_beside_idle_serve" in results:
        beside = results["engine_beside_idle_serve"]
        results["http_stream_over_engine_beside_idle_serve"] = {
            c: http[c]["output_tok_s"] / beside[c]["output_tok_s"] for c in beside if c in http}
        results["engine_beside_idle_serve_over_engine"] = {
            c: beside[c]["output_tok_s"] / eng[c]["output_tok_s"] for c in beside if c in eng}
    targets = []
    for c in (64, 256):
        if c in eng and c in http:
            targets.append(report.target(f"HTTP streamed output tok/s / engine alone, c={c}",
                                         http[c]["output_tok_s"] / eng[c]["output_tok_s"], 0.95))
    if 1 in eng and 1 in http:
        targets.append(report.target("TTFT p50 overhead at c=1 (ms)",
                                     http[1]["ttft_p50_ms"] - eng[1]["ttft_p50_ms"], 10.0,
                                     "lower"))
    if args.gpu and 16 in eng and 16 in http:
        targets.append(report.target("inter-token latency p50 / engine's, c=16",
                                     http[16]["itl_p50_ms"] / eng[16]["itl_p50_ms"], 1.05,
                                     "lower"))
    if args.gpu and "ceiling" in results and 256 in eng and 256 in results["ceiling"]:
        targets.append(report.target("no-cost engine ceiling / engine alone tok/s, c=256",
                                     results["ceiling"][256]["output_tok_s"]
                                     / eng[256]["output_tok_s"], 10.0))
    if args.gpu:
        targets.append(report.target("startup to first answer, warm (s)",
                                     results["startup"][-1]["first_answer_s"], 30.0, "lower"))
    problems = [f"{m} c={c}: {s['errors']} errors, {s['bad_outputs']} bad outputs"
                for m, per in [("engine", eng), *results["serve"].items(),
                               ("ceiling", results.get("ceiling", {}))]
                for c, s in per.items() if s["errors"] or s["bad_outputs"]]
    problems += [f"{m}: {v['equal']} of {v['prompts']} check prompts equal the engine's text"
                 for m, v in results["checks"].items() if v["equal"] != v["prompts"]]
    if "serve_floor" not in results:
        problems.append("incomplete: written before the last phase (Serve's floor)")
    import torch

    doc = {"machine": {"platform": platform.platform(), "cores": os.cpu_count(),
                       "gpu": torch.cuda.get_device_name() if args.gpu else None},
           "versions": {d: md.version(d) for d in ("ray", "torch", "transformers")},
           "date": report.now(), "command": report.command(), "commit": report.commit(),
           "results": results, "problems": problems, "targets": targets}
    kind = report.gpu_short_name() if args.gpu else "cpu"
    out = Path(args.out or ROOT / "bench" / "results" / f"serve-overhead-{kind}.json")
    report.write_atomic(out, json.dumps(doc, indent=2) + "\n")
    report.print_targets(targets)
    for line in problems:
        print("PROBLEM", line)


if __name__ == "__main__":
    main()
