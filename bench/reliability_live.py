"""The live side of bench/reliability.py: its HTTP client, its requests, and Serve's state.

:class:`Bench` sends requests to the deployment's ingress (aiohttp, a connection each, raw
bodies and headers as given) and reads event streams, optionally closing the connection after
the first event (a client going away mid-stream). :func:`request_specs` draws the soak and load
requests. The rest reads and disturbs the Serve application from the driver: the PrefixIndex
deployment's ``replica_stats``, the replicas' actor names, killing one, the count of RUNNING
replicas, and the RSS of this Ray session's replica processes.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

from reliability_cases import CHAT, COMPLETIONS

APP = "optgptq"
WORDS = ("harbour town winter light hills bakers shutters bread quay fishermen weather nets "
         "lantern children wall school gulls library clerk letters market square farmers apples "
         "cheese tinker knives lighthouse tide evening boats river north yellow engine").split()
POISON = [{"temperature": 1e-39}, {"top_p": 1e-320}, {"temperature": 5e-324},
          {"temperature": 1.0, "top_p": 5e-324}, {"temperature": 1e-39, "top_p": 1e-39},
          {"temperature": 2.0, "top_p": 1e-300}, {"temperature": 1e-45, "top_k": 1},
          {"temperature": 1e-320, "top_p": 1e-320, "top_k": -1}]


def q(xs: list[float], p: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None


class Bench:
    """The live deployment: where it listens, its keys, and the calls every part makes."""

    def __init__(self, args, http_port: int, grpc_port: int, keys: list[str]) -> None:
        import aiohttp

        self.args, self.keys = args, keys
        self.url, self.grpc_target = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {keys[0]}"}
        self._aiohttp = aiohttp
        self.session = None

    async def open(self) -> None:
        a = self._aiohttp
        self.session = a.ClientSession(connector=a.TCPConnector(limit=0, force_close=True))

    async def call(self, method: str, path: str, body: bytes, headers: dict, *,
                   first_event: bool = False, timeout: float = 180,
                   track: dict | None = None) -> dict:
        """One HTTP request; for a 200 event stream, its events (``first_event``: close the
        connection after the first one, a client going away mid-stream)."""
        rec = {"status": None, "ttfb": None, "error": None, "replica": None, "events": 0,
               "finish": None, "done": False, "body": b"", "sent": time.perf_counter()}
        try:
            async with self.session.request(
                    method, self.url + path, data=body, headers=headers,
                    skip_auto_headers=("Content-Type",),
                    timeout=self._aiohttp.ClientTimeout(total=timeout)) as r:
                rec["ttfb"] = time.perf_counter() - rec["sent"]
                rec["status"], rec["replica"] = r.status, r.headers.get("x-optgptq-replica")
                if track is not None:  # the request's replica is known from now on
                    track["replica"] = rec["replica"]
                if r.status == 200 and r.content_type == "text/event-stream":
                    async for line in r.content:
                        if not line.startswith(b"data: "):
                            continue
                        if line.strip() == b"data: [DONE]":
                            rec["done"] = True
                            break
                        event = json.loads(line[6:])
                        if "error" in event:
                            rec["error"] = event["error"]
                            break
                        rec["events"] += 1
                        for choice in event.get("choices") or ():  # none: a usage-only chunk
                            rec["finish"] = choice.get("finish_reason") or rec["finish"]
                        if first_event:
                            r.close()
                            break
                else:
                    rec["body"] = await r.read()
        except Exception as exc:  # no answer: refused, reset, timed out
            rec["error"] = f"{type(exc).__name__}: {exc}"[:200]
        rec["latency"] = time.perf_counter() - rec["sent"]
        return rec

    async def generate(self, spec: dict) -> dict:
        """A soak/load request (``spec``: path, body, key, disconnect); ``ok`` says whether it
        got what an innocent client should."""
        headers = {**self.headers, "Authorization": f"Bearer {self.keys[spec['key']]}"}
        body = spec["body"]
        rec = await self.call("POST", spec["path"], json.dumps(body).encode(), headers,
                              first_event=spec.get("disconnect", False), track=spec)
        if rec["status"] != 200 or rec["error"]:
            rec["ok"] = False
        elif spec.get("disconnect"):
            rec["ok"] = rec["events"] >= 1
        elif body.get("stream"):
            rec["ok"] = rec["done"] and rec["finish"] in ("length", "stop")
        else:
            data = json.loads(rec["body"])
            rec["ok"] = (data["choices"][0]["finish_reason"] in ("length", "stop")
                         and data["usage"]["completion_tokens"] == body["max_tokens"])
        rec["body"] = rec["body"][:300].decode("utf-8", "replace")
        return rec

    async def run_pool(self, specs: list, worker, concurrency: int) -> list[dict]:
        todo, out = list(enumerate(specs)), [None] * len(specs)

        async def loop():
            while todo:
                i, spec = todo.pop(0)
                out[i] = await worker(spec)
        await asyncio.gather(*[loop() for _ in range(concurrency)])
        return out


def request_specs(n: int, rng: random.Random, args, disconnect: float = 0.0,
                  poison: float = 0.0) -> list[dict]:
    """Soak/load requests: short word prompts (a third behind one of four shared prefixes),
    completions and chat, streamed or not, both keys, some cache salts, ignore_eos so each
    produces exactly max_tokens."""
    prefixes = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(4)]
    order = rng.sample(range(n), n)  # exactly round(n * fraction) of each, at random places
    poisoned_at = set(order[:round(n * poison)])
    cut_at = set(order[round(n * poison):round(n * poison) + round(n * disconnect)])
    specs = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(5, 40)))
        if rng.random() < 0.33:
            text = rng.choice(prefixes) + " " + text
        poisoned, cut = i in poisoned_at, i in cut_at
        body = {"model": args.model, "max_tokens": rng.randint(4 if cut else 2, args.max_tokens),
                "ignore_eos": True, "stream": cut or rng.random() < 0.5,
                "temperature": rng.choice([0, 0.7, 1.0]), "top_p": rng.choice([1.0, 0.9])}
        if rng.random() < 0.3:
            body["seed"] = rng.randrange(1 << 32)
        if rng.random() < 0.2:
            body["cache_salt"] = f"salt-{rng.randrange(3)}"
        if poisoned:
            body.update(rng.choice(POISON))
        chat = rng.random() < 0.3
        body["messages" if chat else "prompt"] = [{"role": "user", "content": text}] if chat \
            else text
        specs.append({"path": CHAT if chat else COMPLETIONS, "body": body, "key": i % 2,
                      "disconnect": cut, "poisoned": poisoned})
    return specs


# -- Serve and process state ------------------------------------------------------------------
def replica_stats() -> dict[str, dict]:
    from ray import serve
    return serve.get_deployment_handle("PrefixIndex", APP).replica_stats.remote().result(
        timeout_s=10)


def wait_idle(timeout_s: float) -> tuple[dict, float, bool]:
    """Replica stats once every engine replica runs nothing and holds no blocks."""
    t0 = time.monotonic()
    while True:
        try:
            stats = replica_stats()
        except Exception:
            stats = {}
        if len(stats) >= 2 and all(s["running"] == s["waiting"] == s["used_blocks"] == 0
                                   for s in stats.values()):
            return stats, time.monotonic() - t0, True
        if time.monotonic() - t0 > timeout_s:
            return stats, time.monotonic() - t0, False
        time.sleep(0.25)


def named_replicas(deployment: str) -> list[str]:
    import ray
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return [a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)]


def kill_replica(deployment: str, replica: str) -> None:
    import ray
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#{deployment}#{replica}", namespace="serve"),
             no_restart=True)


def running(deployment: str) -> int:
    from ray import serve
    states = serve.status().applications[APP].deployments[deployment].replica_states
    return sum(n for s, n in states.items() if str(s).endswith("RUNNING"))


def serve_rss() -> dict[str, int]:
    """RSS (bytes) of this cluster's engine replica workers (each with its engine process and
    other children) and ingress workers, found under this session's raylet by process title."""
    import psutil
    import ray
    node = ray._private.worker._global_node
    raylet = next(p.pid for kind, p in node.live_processes() if kind == "raylet")
    out = {}
    for proc in psutil.Process(raylet).children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
            role = next((r for r in ("EngineReplica", "Ingress")
                         if f"{APP}:{r}" in title or f"{APP}#{r}" in title), None)
            if role and not title.startswith("ray::IDLE"):
                rss = proc.memory_info().rss + sum(c.memory_info().rss
                                                   for c in proc.children(recursive=True))
                out[f"{role}:{proc.pid}"] = rss
        except psutil.Error:
            continue
    return out


def sample_rss(pid: int, stop: list, peak: list) -> None:
    """Highest RSS of process ``pid`` (bytes) into ``peak[0]`` every 20 ms until ``stop[0]``."""
    import psutil
    proc = psutil.Process(pid)
    while not stop[0]:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.02)
