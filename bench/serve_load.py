"""Serving load test: prefix-aware vs pow2 vs round-robin routing, two engine replicas, on CPU.

Starts Ray and Serve on loopback once, then for each policy deploys the application of
deployments/app.py afresh (cold caches) with ``--replicas`` (default 2) engine replicas of
``--model`` (default ``smollm2``) and replays two workloads, drawn with ``random.Random(--seed)``
so every policy sees the same requests at the same offsets:

- shared-prefix: ``--systems`` long system prompts (a unique tag plus ``--system-tokens`` tokens of
  a fixed English corpus, cut at a different offset per prompt) x many short questions, each
  request one system prompt (uniform) and one question, as chat messages;
- no-sharing: the same lengths, but every request has its own unique system prompt.

Arrivals are Poisson at ``--rate`` requests/s, ``--requests`` per workload, each streamed
(``stream: true``; gRPC ``GenerateStream`` with ``--transport grpc``) with greedy decoding and
``--max-tokens`` output tokens (EOS ignored). Each replica's KV pool has ``--num-blocks`` blocks,
sized so one replica cannot hold every system prompt of the shared workload but the two together
can: that is where placement matters (with room for everything everywhere, any policy hits).

Per run: time to first token (client side, request sent to first content chunk) p50 and p99,
mean inter-token latency, requests/s (completed / wall time from first send to last response),
prefix hit rate (replica-reported cached prompt tokens / prompt tokens admitted, over the run)
and requests per replica. Targets on the shared-prefix workload: prefix-aware's hit rate at least
2x pow2's and its p50 TTFT at most half of pow2's; on no-sharing, its p50 TTFT within 1.25x of
pow2's (equal within noise). Results: ``--out`` (default bench/results/serve-cpu.json).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import os
import platform
import random
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optgptq.client import GRPCClient, HTTPClient  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "serve-cpu.json"
POLICIES = ("prefix_aware", "pow2", "round_robin")
CORPUS = """The harbour town woke slowly in winter. Before the light came over the hills, the bakers
had already opened their shutters, and the smell of bread drifted down to the quay where fishermen
argued about the weather and mended their nets by lantern light. Children ran along the sea wall
on their way to school, counting the gulls and daring each other to step closer to the edge. In
the library above the post office, an old clerk sorted letters that had waited years for an
answer, and wrote careful notes in the margins of ledgers nobody else would read. By noon the
market square was full of voices: farmers selling apples and cheese, a tinker sharpening knives,
travellers asking the way to the lighthouse. When the tide turned in the evening, the boats came
home one by one, and the town gathered to hear what the sea had given and what it had kept. """
QUESTIONS = ["What is the weather like?", "Who sorts the letters?", "Name one market stall.",
             "When do the boats return?", "What do the children count?", "Where is the library?",
             "What do the fishermen mend?", "What does the tinker do?"]


def workload(rng: random.Random, tokenizer, shared: bool, args) -> list[tuple[float, list]]:
    """``(arrival offset s, chat messages)`` per request."""
    words = (CORPUS * 40).split()
    per_token = 1.3  # words per token is about 0.75 for this text; over-cut, then trim by tokens

    def system(tag: str) -> str:
        start = rng.randrange(0, len(words) // 2)
        text = " ".join(words[start:start + int(args.system_tokens * per_token)])
        ids = tokenizer.encode(f"[{tag}] {text}")[:args.system_tokens]
        return tokenizer.decode(ids)

    systems = [system(f"system {i}") for i in range(args.systems)]
    t, out = 0.0, []
    for i in range(args.requests):
        t += rng.expovariate(args.rate)
        prompt = rng.choice(systems) if shared else system(f"request {i}")
        out.append((t, [{"role": "system", "content": prompt},
                        {"role": "user", "content": rng.choice(QUESTIONS)}]))
    return out


def one_request(transport, messages, args, record: dict) -> None:
    sent = time.perf_counter()
    times = []
    try:
        if isinstance(transport, GRPCClient):
            for part in transport.stream(messages, chat=True, max_tokens=args.max_tokens,
                                         temperature=0, ignore_eos=True):
                times.append(time.perf_counter())
                record["replica"] = part.replica
        else:
            for _ in transport.chat(messages, stream=True, max_tokens=args.max_tokens,
                                    temperature=0, ignore_eos=True):
                times.append(time.perf_counter())
    except Exception as exc:  # counted, not fatal: overload shows up as errors
        record["error"] = str(exc)[:200]
    record.update(sent=sent, times=times)


def run(policy: str, name: str, requests, args, ports) -> dict:
    from ray import serve

    http = HTTPClient(f"http://127.0.0.1:{ports[0]}", model=args.model, timeout=900)
    grpc_client = GRPCClient(f"127.0.0.1:{ports[1]}", model=args.model, timeout=900) \
        if args.transport == "grpc" else None
    index = serve.get_deployment_handle("PrefixIndex", "optgptq")
    before = index.replica_stats.remote().result()
    records = [dict() for _ in requests]
    threads = []
    start = time.perf_counter()
    for (offset, messages), record in zip(requests, records):
        time.sleep(max(0.0, start + offset - time.perf_counter()))
        th = threading.Thread(target=one_request,
                              args=(grpc_client or http, messages, args, record))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    wall = max(r["times"][-1] for r in records if r.get("times")) - start
    time.sleep(2.5)  # replicas publish stats every 0.1-2 s
    after = index.replica_stats.remote().result()
    hit = sum(after[r]["prefix_hit_tokens"] - before.get(r, {}).get("prefix_hit_tokens", 0)
              for r in after)
    miss = sum(after[r]["prefix_miss_tokens"] - before.get(r, {}).get("prefix_miss_tokens", 0)
               for r in after)
    ok = [r for r in records if r.get("times") and "error" not in r]
    ttft = sorted(r["times"][0] - r["sent"] for r in ok)
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    per_replica = {r: after[r]["prefix_hit_tokens"] + after[r]["prefix_miss_tokens"]
                   - before.get(r, {}).get("prefix_hit_tokens", 0)
                   - before.get(r, {}).get("prefix_miss_tokens", 0) for r in after}
    return {"policy": policy, "workload": name, "transport": args.transport,
            "requests": len(records), "errors": len(records) - len(ok),
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": ttft[int(0.99 * (len(ttft) - 1))],
            "itl_mean_s": statistics.fmean(itl) if itl else None,
            "requests_per_s": len(ok) / wall, "prefix_hit_rate": hit / (hit + miss),
            "prompt_tokens_per_replica": per_replica}


def deploy(policy: str, args) -> None:
    from deployments.app import deploy as deploy_app

    deploy_app({
        "model": args.model,
        "engine": {"num_blocks": args.num_blocks, "max_num_seqs": 32},
        "replicas": {"num_replicas": args.replicas, "num_cpus": 2 / (args.replicas + 1),
                     "max_ongoing_requests": 64, "max_queued_requests": 1000},
        "router": {"policy": policy, "stats_period_s": 0.5},
        "ingress": {"http_port": args.ports[0], "grpc_port": args.ports[1],
                    "replica_header": True},
    })


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def targets(results: list[dict]) -> list[dict]:
    def ratio(workload: str, key: str) -> float | None:
        pa, p2 = ([r[key] for r in results if r["policy"] == policy and r["workload"] == workload]
                  for policy in ("prefix_aware", "pow2"))
        return pa[0] / max(p2[0], 1e-9) if pa and p2 else None

    rows = [("shared-prefix: prefix hit rate, prefix_aware / pow2",
             ratio("shared-prefix", "prefix_hit_rate"), 2.0, "higher"),
            ("shared-prefix: p50 TTFT, prefix_aware / pow2",
             ratio("shared-prefix", "ttft_p50_s"), 0.5, "lower"),
            ("no-sharing: p50 TTFT, prefix_aware / pow2",
             ratio("no-sharing", "ttft_p50_s"), 1.25, "lower")]
    return [{"name": n, "value": v, "target": t, "better": b,
             "met": v >= t if b == "higher" else v <= t} for n, v, t, b in rows if v is not None]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--rate", type=float, default=0.5, help="Poisson arrivals per second")
    p.add_argument("--systems", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=384)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=160, help="KV blocks per replica")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--workloads", default="shared-prefix,no-sharing")
    p.add_argument("--transport", choices=("http", "grpc"), default="http")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()

    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from optgptq.models.hub import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(args.model)))
    ports = (_free_port(), _free_port())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 x for x in [str(ROOT), os.environ.get("PYTHONPATH")] if x)}})
    args.ports = ports
    results = []
    try:
        for policy in args.policies.split(","):
            for name in args.workloads.split(","):
                shared = {"shared-prefix": True, "no-sharing": False}[name]
                deploy(policy, args)  # fresh replicas: every run starts with cold caches
                requests = workload(random.Random(args.seed), tokenizer, shared, args)
                results.append(run(policy, name, requests, args, ports))
                r = results[-1]
                print(f"{policy:13s} {name:13s} ttft p50 {r['ttft_p50_s']:6.2f}s "
                      f"p99 {r['ttft_p99_s']:6.2f}s  itl {r['itl_mean_s'] or 0:.3f}s  "
                      f"{r['requests_per_s']:.2f} req/s  hit {r['prefix_hit_rate']:.2f}  "
                      f"errors {r['errors']}  per replica {r['prompt_tokens_per_replica']}",
                      flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    doc = {"machine": {"platform": platform.platform(), "cores": os.cpu_count()},
           "versions": {d: md.version(d) for d in ("ray", "torch", "transformers", "optgptq")},
           "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
           "results": results,
           "targets": targets(results)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(args.out)
    for t in doc["targets"]:
        print(f"{t['name']}: {t['value']:.2f} (target {t['target']}, {t['better']}) "
              f"{'met' if t['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
