"""Reliability benchmark: hostile input, a soak, a burst and killed actors against a live deployment.

Starts Ray and Serve on loopback (``ray.init`` + :func:`deployments.app.deploy`, as
bench/serve_load.py does) with 2 engine replicas of ``--model`` (default ``smollm2``), two API
keys (so every request is authenticated and the auth paths are exercised) and
``ingress.replica_header`` (to know which replica served a request), then runs, in this order:

1. **HTTP fuzz**: ``--http-cases`` bodies drawn by hypothesis from the served ``/openapi.json``
   (valid-shaped and mutated, bench/reliability_cases.py) plus the hand-made hostile requests;
   target: no 5xx and no request left unanswered. A 200 is fine for a valid request.
2. **gRPC fuzz**: ``--grpc-cases`` malformed ``Generate``/``GenerateStream`` messages as raw
   bytes; target: none answered UNKNOWN, INTERNAL, UNAVAILABLE or not at all, and the server
   answers a valid call afterwards.
3. **Soak**: ``--soak-requests`` (streaming and unary, completions and chat, two tenants, some
   cache salts), ``--disconnect`` of them closed after their first chunk, ``--poison`` of them
   with denormal temperature / top_p, at ``--concurrency``; a warm-up of the same mix first.
   Targets: no innocent request failed; afterwards no engine blocks in use and nothing running
   (PrefixIndex ``replica_stats`` once idle); RSS of the engine replicas (with their engine
   processes) and the ingress grown by at most 5 %.
   Then a 64 MiB body sent chunked (no Content-Length): its status, and how far the ingress's
   RSS rises while it arrives (whether the size limit holds before the body is buffered).
4. **Burst**: ``--burst`` streaming requests at once; target: each answered (200 or shed with
   429/503) within 2 s of being sent (time to the response status).
5. **Killed index actor**: the PrefixIndex replica killed under a closed-loop load; target: no
   request failed and p99 latency at most 2x the p99 of the same load just before.
6. **Killed engine replica**: one engine replica killed under load; targets: requests lost at
   most the requests it had in flight (plus those not yet routed), and service back (a request
   sent after the kill succeeds, and 2 replicas RUNNING again, the killed one replaced) in 30 s.

The inputs come from bench/reliability_cases.py, the HTTP client, the soak requests and the
reads of Serve's state from bench/reliability_live.py. Results: ``--out`` (default bench/results/reliability-cpu.json; ``--quick``: a ~2-minute smoke
run with small counts, written to the temp folder unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import report  # noqa: E402
from reliability_cases import body_schemas, fuzz_cases, grpc_cases, hostile_cases  # noqa: E402
from reliability_live import (Bench, kill_replica, named_replicas, q, replica_stats,  # noqa: E402
                              request_specs, running, sample_rss, serve_rss, wait_idle)

DEFAULT_OUT = ROOT / "bench" / "results" / "reliability-cpu.json"
BAD_GRPC = {"UNKNOWN", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS", "NO_ANSWER"}


# -- parts ------------------------------------------------------------------------------------
async def part_http_fuzz(b: Bench, tokenizer_vocab: int, max_request_bytes: int) -> dict:
    a = b.args
    openapi = await b.call("GET", "/openapi.json", b"", {"Authorization": b.headers["Authorization"]})
    schemas = body_schemas(json.loads(openapi["body"]))
    t0 = time.perf_counter()
    cases = fuzz_cases(schemas, a.model, b.keys[0], a.http_cases, a.seed, 8, tokenizer_vocab)
    gen_s = time.perf_counter() - t0
    cases += hostile_cases(a.model, b.keys[0], max_request_bytes)
    print(f"http fuzz: {len(cases)} cases ({gen_s:.0f} s to draw)", flush=True)
    recs = await b.run_pool(cases, lambda c: b.call(c.method, c.path, c.body, c.headers,
                                                   first_event=c.capped, timeout=300), 8)
    statuses = Counter(str(r["status"]) for r in recs)
    by_kind: dict[str, Counter] = {}
    for c, r in zip(cases, recs):
        by_kind.setdefault(c.kind.split(":")[0] if not c.kind.startswith("hostile") else
                           "hostile", Counter())[str(r["status"])] += 1
        by_kind.setdefault(c.kind, Counter())[str(r["status"])] += 1

    def example(c, r):
        return {**c.describe(b.keys[0]), "status": r["status"], "error": r["error"],
                "response": r["body"][:300].decode("utf-8", "replace")}

    five = [(c, r) for c, r in zip(cases, recs) if r["status"] and r["status"] >= 500]
    lost = [(c, r) for c, r in zip(cases, recs) if r["status"] is None]
    stream_errors = [(c, r) for c, r in zip(cases, recs) if r["status"] == 200 and r["error"]]
    unexpected = [(c, r) for c, r in zip(cases, recs) if c.expect and r["status"] not in c.expect]
    samples: dict[str, list] = {}
    for c, r in zip(cases, recs):
        if not c.kind.startswith("hostile") and len(samples.setdefault(c.kind, [])) < 3:
            samples[c.kind].append({**c.describe(b.keys[0], 160), "status": r["status"]})
    health = await b.call("GET", "/health", b"", {})
    return {"cases": len(cases), "fuzzed": a.http_cases, "hostile": len(cases) - a.http_cases,
            "schema_paths": sorted(schemas), "draw_s": round(gen_s, 1),
            "status_histogram": dict(statuses),
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
            "responses_5xx": len(five), "no_answer": len(lost),
            "errors_in_200_streams": len(stream_errors),
            "examples_5xx": [example(c, r) for c, r in five[:10]],
            "examples_no_answer": [example(c, r) for c, r in lost[:10]],
            "examples_errors_in_200_streams": [example(c, r) for c, r in stream_errors[:5]],
            "hostile_unexpected_status": [example(c, r) | {"expected": c.expect}
                                          for c, r in unexpected[:20]],
            "samples": samples,
            "slowest": [{**c.describe(b.keys[0], 120), "status": r["status"],
                         "seconds": round(r["latency"], 2)}
                        for c, r in sorted(zip(cases, recs), key=lambda cr: -cr[1]["latency"])[:8]],
            "health_after": health["status"]}


async def oversized_stream(b: Bench, size: int) -> dict:
    """A body of ``size`` bytes sent chunked (no Content-Length), 1 MiB at a time: the status,
    how long the server took, and how far the ingress's RSS rose meanwhile."""
    pid = int(next(k for k in await asyncio.to_thread(serve_rss) if k.startswith("Ingress"))
              .split(":")[1])
    import psutil
    base = psutil.Process(pid).memory_info().rss
    stop, peak = [False], [base]
    sampler = asyncio.create_task(asyncio.to_thread(sample_rss, pid, stop, peak))

    async def chunks():
        for _ in range(size >> 20):
            yield b'{"model": "x", "prompt": "' if _ == 0 else b"x" * (1 << 20)
    rec = await b.call("POST", "/v1/completions", chunks(), b.headers, timeout=300)
    stop[0] = True
    await sampler
    return {"bytes": size, "status": rec["status"], "error": rec["error"],
            "seconds": round(rec["latency"], 2),
            "ingress_rss_peak_rise_mib": round((peak[0] - base) / 2**20, 1)}


def part_grpc_fuzz(b: Bench, max_request_bytes: int) -> dict:
    import grpc
    from optgptq.serving import optgptq_pb2 as pb

    a = b.args
    cases = grpc_cases(a.grpc_cases, a.seed, a.model, b.keys[0], max_request_bytes)
    channel = grpc.insecure_channel(b.grpc_target, options=[
        ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 << 20)])

    def one(case):
        try:
            if case.method.endswith("Stream"):
                list(channel.unary_stream(case.method)(case.body, metadata=case.metadata,
                                                       timeout=120))
            else:
                channel.unary_unary(case.method)(case.body, metadata=case.metadata, timeout=120)
            return "OK", ""
        except grpc.RpcError as exc:
            return exc.code().name, (exc.details() or "")[:200]
        except Exception as exc:
            return "NO_ANSWER", f"{type(exc).__name__}: {exc}"[:200]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, cases))
    valid = pb.GenerateRequest(model=a.model, prompt="The harbour town", max_tokens=3)
    code, detail = one(type(cases[0])("check", "/optgptq.OptGPTQ/Generate",
                                      valid.SerializeToString(),
                                      [("authorization", f"Bearer {b.keys[1]}")]))
    bad = [(c, r) for c, r in zip(cases, results) if r[0] in BAD_GRPC]
    by_kind: dict[str, Counter] = {}
    for c, (status, _) in zip(cases, results):
        by_kind.setdefault(c.kind, Counter())[status] += 1
    return {"messages": len(cases), "status_histogram": dict(Counter(r[0] for r in results)),
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
            "bad_status": len(bad), "bad_status_codes": sorted(BAD_GRPC),
            "examples_bad": [{**c.describe(), "status": r[0], "details": r[1]} for c, r in bad[:10]],
            "valid_call_after": code, "valid_call_after_detail": detail}


async def part_soak(b: Bench) -> dict:
    a = b.args
    warm = request_specs(a.warmup, random.Random(a.seed + 1), a, a.disconnect, a.poison)
    await b.run_pool(warm, b.generate, a.concurrency)
    idle_before = await asyncio.to_thread(wait_idle, 120)
    rss_before = await asyncio.to_thread(serve_rss)
    specs = request_specs(a.soak_requests, random.Random(a.seed + 2), a, a.disconnect, a.poison)
    t0 = time.perf_counter()
    recs = await b.run_pool(specs, b.generate, a.concurrency)
    wall = time.perf_counter() - t0
    stats, idle_s, idle = await asyncio.to_thread(wait_idle, 60)
    await asyncio.sleep(2)
    rss_after = await asyncio.to_thread(serve_rss)
    innocent = [(s, r) for s, r in zip(specs, recs) if not s["poisoned"]]
    failed = [(s, r) for s, r in innocent if not r["ok"]]
    poisoned_failed = [(s, r) for s, r in zip(specs, recs) if s["poisoned"] and not r["ok"]]
    common = sorted(set(rss_before) & set(rss_after))
    before, after = sum(rss_before[k] for k in common), sum(rss_after[k] for k in common)

    def example(s, r):
        return {"body": json.dumps(s["body"])[:240], "disconnect": s["disconnect"],
                "status": r["status"], "error": r["error"], "response": r["body"][:200]}

    return {"requests": len(specs), "warmup_requests": len(warm), "concurrency": a.concurrency,
            "wall_s": round(wall, 1), "requests_per_s": round(len(specs) / wall, 2),
            "disconnected": sum(s["disconnect"] for s in specs),
            "poisoned": sum(s["poisoned"] for s in specs),
            "streamed": sum(bool(s["body"]["stream"]) for s in specs),
            "status_histogram": dict(Counter(str(r["status"]) for r in recs)),
            "innocent_failed": len(failed), "poisoned_failed": len(poisoned_failed),
            "examples_innocent_failed": [example(s, r) for s, r in failed[:10]],
            "examples_poisoned_failed": [example(s, r) for s, r in poisoned_failed[:10]],
            "latency_p50_s": q([r["latency"] for _, r in innocent if r["ok"]], 0.5),
            "latency_p99_s": q([r["latency"] for _, r in innocent if r["ok"]], 0.99),
            "idle_before": idle_before[2], "idle_after": idle, "idle_after_wait_s": round(idle_s, 1),
            "leaked_blocks": sum(s["used_blocks"] for s in stats.values()) if stats else None,
            "running_after": sum(s["running"] + s["waiting"] for s in stats.values()) if stats else None,
            "replica_stats_after": stats,
            "rss_before_mib": {k: round(v / 2**20, 1) for k, v in rss_before.items()},
            "rss_after_mib": {k: round(v / 2**20, 1) for k, v in rss_after.items()},
            "rss_growth_pct": round(100 * (after - before) / before, 2) if before else None,
            "rss_growth_pct_by_process": {k: round(100 * (rss_after[k] / rss_before[k] - 1), 2)
                                          for k in common}}


async def part_burst(b: Bench) -> dict:
    a = b.args
    specs = request_specs(a.burst, random.Random(a.seed + 3), a)
    for s in specs:
        s["body"].update(stream=True, max_tokens=a.burst_max_tokens)
    await asyncio.to_thread(wait_idle, 60)
    recs = await asyncio.gather(*[b.generate(s) for s in specs])
    ttfb = [r["ttfb"] for r in recs if r["ttfb"] is not None]
    statuses = Counter(str(r["status"]) for r in recs)
    shed = statuses.get("429", 0) + statuses.get("503", 0)
    return {"requests": len(recs), "status_histogram": dict(statuses),
            "fraction_200": statuses.get("200", 0) / len(recs), "fraction_shed": shed / len(recs),
            "unanswered": len(recs) - len(ttfb),
            "accepted_then_failed": sum(1 for r in recs if r["status"] == 200 and not r["ok"]),
            "time_to_status_max_s": max(ttfb) if len(ttfb) == len(recs) else None,
            "time_to_status_p50_s": q(ttfb, 0.5), "time_to_status_p99_s": q(ttfb, 0.99),
            "over_2s": sum(1 for t in ttfb if t > 2.0),
            "time_to_status_by_status": {
                st: {"n": len(xs), "min_s": round(min(xs), 3), "p50_s": round(q(xs, 0.5), 3),
                     "max_s": round(max(xs), 3)}
                for st in statuses if (xs := [r["ttfb"] for r in recs
                                              if str(r["status"]) == st and r["ttfb"]])}}


async def closed_loop(b: Bench, seconds: float, concurrency: int, max_tokens: int, seed: int,
                      during=None, until=None) -> tuple[list, list, dict]:
    """``concurrency`` clients sending streamed requests back to back for ``seconds`` (or until
    ``until()`` is true); ``during(inflight)`` runs meanwhile. Returns (specs, records, in flight
    at the moment ``during`` returned)."""
    rng, stop, recs, inflight = random.Random(seed), [False], [], {}
    t_end = time.perf_counter() + seconds

    async def client(i):
        while not stop[0]:
            spec = request_specs(1, rng, b.args)[0]
            spec["body"].update(stream=True, max_tokens=max_tokens, temperature=0)
            inflight[id(spec)] = spec
            rec = await b.generate(spec)
            del inflight[id(spec)]
            recs.append((spec, rec))

    async def stopper():
        while time.perf_counter() < t_end and not (until and await until()):
            await asyncio.sleep(0.25)
        stop[0] = True

    tasks = [asyncio.create_task(client(i)) for i in range(concurrency)]
    snapshot = await during(inflight) if during else {}
    await stopper()
    await asyncio.gather(*tasks)
    return [s for s, _ in recs], [r for _, r in recs], snapshot


async def part_index_kill(b: Bench) -> dict:
    a = b.args
    await asyncio.to_thread(wait_idle, 60)
    _, base, _ = await closed_loop(b, a.window_s, a.load_concurrency, a.max_tokens, a.seed + 4)
    victims = await asyncio.to_thread(named_replicas, "PrefixIndex")
    metrics_lat, rebuilt = [], {}

    async def watch_rebuild(t_kill):  # a new index replica that knows both engine replicas
        while time.perf_counter() - t_kill < 120:
            new = await asyncio.to_thread(named_replicas, "PrefixIndex")
            try:
                stats = await asyncio.to_thread(replica_stats) if new and new != victims else {}
            except Exception:
                stats = {}
            if len(stats) >= 2:
                rebuilt["s"] = time.perf_counter() - t_kill
                return
            await asyncio.sleep(0.25)

    async def kill(inflight):
        await asyncio.sleep(1.0)
        await asyncio.to_thread(kill_replica, "PrefixIndex", victims[0])
        t = time.perf_counter()
        watcher = asyncio.create_task(watch_rebuild(t))
        while time.perf_counter() - t < a.window_s - 1:  # /metrics must not wait for the dead actor
            r = await b.call("GET", "/metrics", b"", {"Authorization": b.headers["Authorization"]},
                             timeout=30)
            metrics_lat.append((round(time.perf_counter() - t, 2), r["status"],
                                round(r["latency"], 3)))
            await asyncio.sleep(0.5)
        await watcher
        return {}

    _, after, _ = await closed_loop(b, a.window_s + 1, a.load_concurrency, a.max_tokens,
                                    a.seed + 5, during=kill)
    base_ok = [r["latency"] for r in base if r["ok"]]
    after_ok = [r["latency"] for r in after if r["ok"]]
    failed = [r for r in after if not r["ok"]]
    return {"window_s": a.window_s, "concurrency": a.load_concurrency,
            "baseline_requests": len(base), "baseline_failed": sum(not r["ok"] for r in base),
            "baseline_p50_s": q(base_ok, 0.5), "baseline_p99_s": q(base_ok, 0.99),
            "after_kill_requests": len(after), "after_kill_failed": len(failed),
            "after_kill_p50_s": q(after_ok, 0.5), "after_kill_p99_s": q(after_ok, 0.99),
            "p99_ratio": (q(after_ok, 0.99) / q(base_ok, 0.99)) if base_ok and after_ok else None,
            "examples_failed": [{"status": r["status"], "error": r["error"]} for r in failed[:5]],
            "index_rebuilt_s": rebuilt.get("s"), "metrics_calls": len(metrics_lat),
            "metrics_slow_calls": [m for m in metrics_lat if m[2] > 0.25][:20],
            "metrics_max_latency_s": max((m[2] for m in metrics_lat), default=None)}


async def part_replica_kill(b: Bench) -> dict:
    a = b.args
    await asyncio.to_thread(wait_idle, 60)
    before = set(await asyncio.to_thread(named_replicas, "EngineReplica"))
    snap: dict = {}
    state = {"t_kill": None, "replaced_s": None}

    async def kill(inflight):
        await asyncio.sleep(3.0)
        on = Counter(s.get("replica") for s in inflight.values())
        victim = max((r for r in on if r), key=lambda r: on[r], default=sorted(before)[0])
        try:  # what the victim itself last reported (published every 0.1 s while busy)
            reported = (await asyncio.to_thread(replica_stats)).get(victim, {})
        except Exception:
            reported = {}
        snap.update(victim=victim, in_flight_on_victim=on.get(victim, 0),
                    in_flight_unrouted=on.get(None, 0), in_flight_total=len(inflight),
                    victim_reported_running_waiting=reported.get("running", 0)
                    + reported.get("waiting", 0) if reported else None)
        await asyncio.to_thread(kill_replica, "EngineReplica", victim)
        state["t_kill"] = time.perf_counter()
        return snap

    async def replaced():  # a new replica RUNNING beside the survivor, then 3 s of its traffic
        if state["replaced_s"] is None:
            names = set(await asyncio.to_thread(named_replicas, "EngineReplica"))
            if names - before and snap["victim"] not in names \
                    and await asyncio.to_thread(running, "EngineReplica") >= 2:
                state["replaced_s"] = time.perf_counter() - state["t_kill"]
            return False
        return time.perf_counter() - state["t_kill"] > state["replaced_s"] + 3

    _, recs, _ = await closed_loop(b, a.kill_window_s, a.kill_concurrency, a.kill_max_tokens,
                                   a.seed + 6, during=kill, until=replaced)
    t_kill = state["t_kill"]
    failed = [r for r in recs if not r["ok"]]
    after = sorted(r["sent"] + r["latency"] - t_kill for r in recs if r["ok"] and r["sent"] > t_kill)
    new = sorted(set(await asyncio.to_thread(named_replicas, "EngineReplica")) - before)
    served_new = [r["sent"] + r["latency"] - t_kill for r in recs if r["ok"] and r["replica"] in new]
    back = max(after[0] if after else float("inf"), state["replaced_s"] or float("inf"))
    return {**snap, "requests": len(recs), "failed": len(failed),
            "lost_allowed": snap["in_flight_on_victim"] + snap["in_flight_unrouted"],
            "failed_sent_after_kill": sum(1 for r in failed if r["sent"] > t_kill),
            "examples_failed": [{"status": r["status"], "error": r["error"],
                                 "replica": r["replica"]} for r in failed[:8]],
            "first_success_after_kill_s": after[0] if after else None,
            "replaced_and_running_s": state["replaced_s"], "new_replicas": new,
            "first_served_by_new_replica_s": min(served_new) if served_new else None,
            "service_back_s": back if back != float("inf") else None}


def targets(r: dict) -> list[dict]:
    def t(name, value, goal, better):  # None or inf: not measured or never happened, missed
        if value is None or value == float("inf"):
            return {"name": name, "value": None, "target": goal, "better": better, "met": False}
        return report.target(name, value, goal, better)
    rows = []
    if "http_fuzz" in r:
        rows += [t("http_fuzz_responses_5xx", r["http_fuzz"]["responses_5xx"], 0, "lower"),
                 t("http_fuzz_no_answer", r["http_fuzz"]["no_answer"], 0, "lower")]
    if "grpc_fuzz" in r:
        g = r["grpc_fuzz"]
        rows += [t("grpc_malformed_bad_status", g["bad_status"], 0, "lower"),
                 t("grpc_serving_after", float(g["valid_call_after"] == "OK"), 1, "higher")]
    if "soak" in r:
        s = r["soak"]
        rows += [t("soak_innocent_failed", s["innocent_failed"], 0, "lower"),
                 t("soak_leaked_blocks", s["leaked_blocks"] if s["idle_after"] else
                   max(1, s["leaked_blocks"] or 0), 0, "lower"),
                 t("soak_rss_growth_pct", s["rss_growth_pct"], 5.0, "lower")]
    if "burst" in r:
        m = r["burst"]["time_to_status_max_s"]
        rows.append(t("burst_max_time_to_status_s", m, 2.0, "lower"))
    if "index_kill" in r:
        k = r["index_kill"]
        rows += [t("index_kill_failed", k["after_kill_failed"], 0, "lower"),
                 t("index_kill_p99_vs_baseline", k["p99_ratio"], 2.0, "lower")]
    if "replica_kill" in r:
        k = r["replica_kill"]
        rows += [t("replica_kill_requests_lost", k["failed"], k["lost_allowed"], "lower"),
                 t("replica_kill_service_back_s", k["service_back_s"], 30.0, "lower")]
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--http-cases", type=int, default=1000, help="fuzzed HTTP bodies")
    p.add_argument("--grpc-cases", type=int, default=200, help="malformed gRPC messages")
    p.add_argument("--soak-requests", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200, help="soak-mix requests before the soak")
    p.add_argument("--disconnect", type=float, default=0.3, help="soak fraction cut mid-stream")
    p.add_argument("--poison", type=float, default=0.05, help="soak fraction with denormals")
    p.add_argument("--concurrency", type=int, default=16, help="soak clients")
    p.add_argument("--max-tokens", type=int, default=8, help="largest soak/load max_tokens")
    p.add_argument("--burst", type=int, default=300)
    p.add_argument("--burst-max-tokens", type=int, default=4)
    p.add_argument("--load-concurrency", type=int, default=4, help="index-kill load clients")
    p.add_argument("--window-s", type=float, default=30, help="index-kill baseline/after window")
    p.add_argument("--kill-concurrency", type=int, default=6)
    p.add_argument("--kill-max-tokens", type=int, default=24)
    p.add_argument("--kill-window-s", type=float, default=90, help="longest replica-kill run")
    p.add_argument("--parts", default="http,grpc,soak,burst,index,replica")
    p.add_argument("--quick", action="store_true", help="small counts: a ~2-minute smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument("--note", action="append", default=[], help="a line for the results' notes")
    args = p.parse_args()
    if args.quick:
        args.http_cases, args.grpc_cases, args.soak_requests, args.warmup = 120, 40, 120, 24
        args.burst, args.window_s, args.kill_window_s = 100, 6, 60
    args.out = args.out or (Path(tempfile.gettempdir()) / "reliability-cpu-quick.json"
                            if args.quick else DEFAULT_OUT)
    return args


def main() -> int:
    args = parse_args()
    import ray
    from transformers import AutoTokenizer

    from deployments.app import deploy
    from optgptq.models.hub import resolve_model

    vocab = len(AutoTokenizer.from_pretrained(str(resolve_model(args.model))))
    keys = [f"sk-bench-{secrets.token_hex(16)}" for _ in range(2)]
    http_port, grpc_port, max_request_bytes = free_port(), free_port(), 1 << 20
    t_start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 x for x in [str(ROOT), os.environ.get("PYTHONPATH")] if x)}})
    results: dict = {"mode": "quick" if args.quick else "full", "errors": {}}
    try:
        deploy({"model": args.model,
                "engine": {"block_size": 16, "kv_cache_bytes": 256 << 20, "max_num_seqs": 32,
                           "max_num_batched_tokens": 1024},
                "replicas": {"num_replicas": 2, "max_ongoing_requests": 32,
                             "max_queued_requests": 64, "max_waiting": 64},
                "router": {"stats_period_s": 0.5},
                "ingress": {"http_port": http_port, "grpc_port": grpc_port, "api_keys": keys,
                            "replica_header": True, "max_request_bytes": max_request_bytes}})
        results["deploy_s"] = round(time.perf_counter() - t_start, 1)
        print(f"deployed in {results['deploy_s']} s", flush=True)
        b = Bench(args, http_port, grpc_port, keys)
        parts = args.parts.split(",")

        async def async_parts():
            await b.open()
            for _ in range(240):  # the ingress answers once an engine replica has
                if (await b.call("GET", "/health", b"", {}))["status"] == 200:
                    break
                await asyncio.sleep(0.5)
            plan = [("http", "http_fuzz", lambda: part_http_fuzz(b, vocab, max_request_bytes)),
                    ("grpc", "grpc_fuzz", lambda: asyncio.to_thread(part_grpc_fuzz, b,
                                                                    max_request_bytes)),
                    ("soak", "soak", lambda: part_soak(b)),
                    ("http", "oversized_chunked_body", lambda: oversized_stream(b, 64 << 20)),
                    ("burst", "burst", lambda: part_burst(b)),
                    ("index", "index_kill", lambda: part_index_kill(b)),
                    ("replica", "replica_kill", lambda: part_replica_kill(b))]
            for flag, key, run in plan:
                if flag not in parts:
                    continue
                t0 = time.perf_counter()
                print(f"-- {key}", flush=True)
                try:
                    results[key] = await run()
                    results[key]["part_s"] = round(time.perf_counter() - t0, 1)
                except Exception as exc:  # recorded; the other parts still run
                    results["errors"][key] = f"{type(exc).__name__}: {exc}"[:500]
                print(f"   {key}: {time.perf_counter() - t0:.0f} s", flush=True)
            await b.session.close()

        asyncio.run(async_parts())
    finally:
        from ray import serve
        serve.shutdown()
        ray.shutdown()
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    import importlib.metadata as md
    doc = {"machine": report.cpu_machine(),
           "versions": {d: md.version(d) for d in ("ray", "torch", "transformers", "grpcio",
                                                    "hypothesis", "hypothesis-jsonschema",
                                                    "aiohttp", "optgptq")},
           "date": report.now(), "command": report.command(), "commit": report.commit(),
           "notes": [
               "2 CPU cores shared with other jobs (compiles, other test and benchmark runs "
               "while this ran): latencies and the burst timing include that contention, and "
               "the load clients run on the same cores as the server.",
               f"Deployment: 2 engine replicas of {args.model} (float32 CPU, KV 256 MiB each), "
               "max_ongoing_requests 32 + max_queued_requests 64 per deployment router, "
               "max_waiting 64, two API keys, replica_header on, loopback only.",
               "Fuzz bodies are drawn from the served /openapi.json schemas narrowed to cheap "
               "requests (served model name, max_tokens <= 8, short texts) before mutation; a "
               "body that may generate long (max_tokens null or > 16) is sent streamed and its "
               "connection closed after the first event. Every 5xx counts, also to valid bodies.",
               "RSS: engine replica workers with their engine processes, and the ingress worker, "
               "after a warm-up of the soak mix vs after the soak once idle.", *args.note],
           "results": results, "targets": targets(results)}
    report.write_atomic(args.out, json.dumps(doc, indent=2, default=str) + "\n")
    report.print_targets(doc["targets"])
    for key, err in results["errors"].items():
        print(f"ERROR in {key}: {err}")
    print(f"results: {args.out} ({results['total_s']:.0f} s)")
    return 0 if all(t["met"] for t in doc["targets"]) and not results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
