"""Load for the serving benchmarks: prompts of an exact token length, streaming clients, summaries.

:func:`run_clients` sends texts through one path of a deployment (``http-stream``,
``http-unary``: OpenAI completions over aiohttp; ``grpc-stream``: ``GenerateStream`` over
grpc.aio) at a given concurrency, split over client processes (this module re-invoked with a
spec file), released together at a common start time so that their start-up is not timed.
Each request yields a record: time to first non-empty chunk, the gaps between chunks, output
tokens, text, finish reason, error. :func:`summary` turns records into one row: output tok/s
over the wall time, TTFT and inter-chunk latency p50/p99, errors and outputs that did not end
as asked.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("harbour town winter light hills bakers shutters bread quay fishermen weather nets "
         "lantern children wall school gulls edge library clerk letters answer ledgers market "
         "square farmers apples cheese tinker knives travellers lighthouse tide evening boats "
         "river north yellow engine grain seven tower signal maple quiet paged cache block").split()


def prompts(tokenizer, n: int, length: int, seed: int) -> list[str]:
    """``n`` distinct texts of exactly ``length`` tokens (as the ingress tokenizes them)."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        words = " ".join(rng.choice(WORDS) for _ in range(length * 2))
        text = tokenizer.decode(tokenizer.encode(words, add_special_tokens=True)[:length],
                                skip_special_tokens=True)
        if len(tokenizer.encode(text, add_special_tokens=True)) == length:
            out.append(text)
    return out


def summary(records: list[dict], wall: float, max_tokens: int) -> dict:
    """One path at one concurrency: throughput, TTFT and inter-chunk latency."""
    ok = [r for r in records if r.get("error") is None]
    ttft = sorted(r["ttft"] for r in ok)
    gaps = sorted(g for r in ok for g in r["gaps"])
    tokens = sum(r["tokens"] for r in ok)

    def q(xs, p):
        return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None

    return {"requests": len(records), "errors": len(records) - len(ok),
            "error_samples": [r["error"] for r in records if r.get("error")][:3],
            "bad_outputs": sum(1 for r in ok if r["tokens"] != max_tokens
                               or r.get("finish_reason") != "length"),
            "output_tokens": tokens, "wall_s": wall, "output_tok_s": tokens / wall,
            "ttft_p50_ms": q(ttft, 0.5) * 1e3 if ttft else None,
            "ttft_p99_ms": q(ttft, 0.99) * 1e3 if ttft else None,
            "itl_p50_ms": q(gaps, 0.5) * 1e3 if gaps else None,
            "itl_p99_ms": q(gaps, 0.99) * 1e3 if gaps else None,
            "chunks_per_request": statistics.mean(len(r["gaps"]) + 1 for r in ok) if ok else 0}


# -- client processes -------------------------------------------------------------------------
def _tick(rec: dict, t0: float, last: float | None) -> float:
    """A chunk arrived: the first sets the record's TTFT, later ones add a gap; returns now."""
    now = time.perf_counter()
    if last is None:
        rec["ttft"] = now - t0
    else:
        rec["gaps"].append(now - last)
    return now


async def _http_one(session, url: str, model: str, text: str, max_tokens: int,
                    stream: bool) -> dict:
    body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    t0 = time.perf_counter()
    rec = {"gaps": [], "tokens": 0, "text": "", "error": None, "finish_reason": None}
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            return {**rec, "error": f"{r.status}: {(await r.text())[:200]}"}
        if not stream:
            data = await r.json()
            rec["ttft"] = time.perf_counter() - t0
            c = data["choices"][0]
            return {**rec, "text": c["text"], "finish_reason": c["finish_reason"],
                    "tokens": data["usage"]["completion_tokens"]}
        last, parts = None, []
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {**rec, "error": chunk["error"]["message"]}
            last = _tick(rec, t0, last)
            c = chunk["choices"][0]
            parts.append(c["text"])
            rec["finish_reason"] = c["finish_reason"] or rec["finish_reason"]
    rec["text"] = "".join(parts)
    rec["tokens"] = max_tokens if rec["finish_reason"] == "length" else len(parts)
    return rec


async def _grpc_one(stub, pb, model: str, text: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    rec = {"gaps": [], "tokens": 0, "text": "", "error": None, "finish_reason": None}
    last, parts = None, []
    try:
        async for m in stub.GenerateStream(pb.GenerateRequest(
                model=model, prompt=text, max_tokens=max_tokens, temperature=0,
                ignore_eos=True)):
            last = _tick(rec, t0, last)
            parts.append(m.text)
            rec["tokens"], rec["finish_reason"] = m.completion_tokens, m.finish_reason or None
    except Exception as exc:  # grpc.aio.AioRpcError
        return {**rec, "error": str(exc)[:200]}
    return {**rec, "text": "".join(parts)}


async def _client(spec: dict) -> list[dict]:
    """Run ``spec['slots']`` request loops over ``spec['texts']`` from ``spec['start_at']``."""
    texts, mode, out = list(spec["texts"]), spec["mode"], []
    if mode.startswith("grpc"):
        import grpc

        from optgptq.serving import optgptq_pb2 as pb, optgptq_pb2_grpc

        channel = grpc.aio.insecure_channel(spec["grpc"])
        stub = optgptq_pb2_grpc.OptGPTQStub(channel)
        call = lambda t: _grpc_one(stub, pb, spec["model"], t, spec["max_tokens"])  # noqa: E731
    else:
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                        timeout=aiohttp.ClientTimeout(total=1800))
        call = lambda t: _http_one(session, spec["url"], spec["model"], t,  # noqa: E731
                                   spec["max_tokens"], mode != "http-unary")

    async def loop():
        while texts:
            text = texts.pop()
            try:
                rec = await call(text)
            except Exception as exc:
                rec = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            out.append({**rec, "prompt": text, "end": time.time()})

    await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
    await asyncio.gather(*[loop() for _ in range(spec["slots"])])
    if mode.startswith("grpc"):
        await channel.close()
    else:
        await session.close()
    return out


def run_clients(mode: str, texts: list[str], concurrency: int, args, ports) -> tuple[list, float]:
    """``texts`` through ``mode`` at ``concurrency``, split over client processes."""
    n = max(1, min(args.clients, concurrency))
    with tempfile.TemporaryDirectory() as tmp:
        procs, start_at = [], time.time() + 2.0 + 0.2 * n
        for i in range(n):
            spec = {"mode": mode, "texts": texts[i::n], "model": "bench",
                    "slots": concurrency // n + (i < concurrency % n),
                    "url": f"http://127.0.0.1:{ports[0]}", "grpc": f"127.0.0.1:{ports[1]}",
                    "max_tokens": args.max_tokens, "start_at": start_at}
            path = Path(tmp) / f"client{i}.json"
            path.write_text(json.dumps(spec))
            procs.append((subprocess.Popen([sys.executable, __file__, str(path)]), path))
        records = []
        for p, path in procs:
            if p.wait() != 0:
                raise RuntimeError(f"client process exited {p.returncode}")
            records += json.loads(path.with_suffix(".out").read_text())
    ends = [r["end"] for r in records if "end" in r]
    return records, (max(ends) if ends else time.time()) - start_at


def client_main(path: str) -> None:
    spec = json.loads(Path(path).read_text())
    out = asyncio.run(_client(spec))
    Path(path).with_suffix(".out").write_text(json.dumps(out))


if __name__ == "__main__":
    client_main(sys.argv[1])
