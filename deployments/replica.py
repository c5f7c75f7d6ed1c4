"""Engine replica: one engine (one accelerator, a share of one, or a CPU share; one KV pool).

The engine is this project's :class:`~optgptq.engine.async_engine.AsyncLLMEngine` with its core
in a child process (``backend: native``, or ``synthetic``: no model, tokens at no cost), or
vLLM's async engine (:class:`~optgptq.serving.vllm_engine.VLLMEngine`, ``backend: vllm``, its
engine core in a child process too); both offer the same calls, so everything below holds for
either. With vLLM, cache events are vLLM's KV cache events mapped onto the router's block
hashes, and the stats come from vLLM's scheduler.

:meth:`EngineReplica.generate` admits one request and ends with it (with ``n`` choices: once
all have ended); its tokens go to the token channel of the ingress that sent it
(:meth:`subscribe`, deployments/token_channel.py), each choice's under its own id. A request
whose call is cancelled (client gone) is aborted by the engine and its blocks freed. Admission
is bounded: beyond ``max_waiting`` requests queued in the engine the replica answers 503
instead of growing its queue (Serve's ``max_ongoing_requests`` and ``max_queued_requests`` bound
the layers above). A background task sends the block pool's cache events and the engine stats
to the router actor (every ``publish_period_s`` while the engine works, every 0.5 s when idle);
a restarted router actor gets a snapshot of the replica's blocks at once; the same stats feed
Serve's routing stats (:meth:`record_routing_stats`) and the KV-pressure
autoscaling policy (:meth:`record_autoscaling_stats`). A replica whose engine process died fails
Serve's health check and is replaced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

from ray import serve

from optgptq.config import EngineConfig
from optgptq.engine.async_engine import AsyncLLMEngine
from optgptq.engine.core_loop import CORES
from optgptq.engine.sequence import InvalidRequest
from optgptq.serving.vllm_engine import VLLMEngine
from deployments.serve_calls import TRANSPORT, background
from deployments.token_channel import ATTACH_TIMEOUT_S, Outboxes
from optgptq.serving.protocol import APIError, EngineRequest, Subscription, choice_id

log = logging.getLogger("ray.serve")
ACCEPTED = "accepted"
"""generate's second message: the engine took the request (its first is the replica's id)."""
BACKENDS = (*CORES, "vllm")
RATE_WINDOW_S = 10.0
HEARTBEAT_S = 2.0


class EngineReplica:
    def __init__(self, engine: dict, index, max_waiting: int = 64,
                 publish_period_s: float = 0.1, backend: str = "native",
                 backend_args: dict | None = None) -> None:
        self.config = EngineConfig.from_dict(engine)
        self.backend = backend
        if backend == "vllm":
            self.engine = VLLMEngine(self.config, backend_args, record_cache_events=True)
        elif backend in CORES:
            self.engine = AsyncLLMEngine(self.config, record_cache_events=True, core=backend,
                                         core_options=backend_args, process=True)
        else:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.max_waiting = max_waiting
        self._index = index.options(**TRANSPORT)
        self._period = publish_period_s
        self._produced: deque[tuple[float, int]] = deque()  # (time, tokens) for tokens/s
        self.outboxes = Outboxes()
        self.cancelled = 0
        self._publisher = background(self._publish_loop())

    async def generate(self, request: EngineRequest) -> AsyncIterator[str]:
        """Admit one request: yields this replica's id at once (routed), then :data:`ACCEPTED`
        once the engine took it, then ends with the request. Its outputs go to the token channel of ``request.ingress``. Raises
        APIError 400 (invalid), 503 (engine queue full, channel never attached) or 500."""
        if self.engine.stats().waiting >= self.max_waiting:
            raise APIError(503, f"replica queue is full ({self.max_waiting} waiting requests)",
                           code="overloaded")
        rid, box = request.request_id, self.outboxes.get(request.ingress)
        produced = self._produced

        def on_delta(d: tuple) -> None:
            n = len(d[2])
            if n:
                produced.append((time.monotonic(), n))
            box.put([choice_id(rid, d[10]), d[1], n, d[3], d[4],
                     None if d[7] is None else len(d[7]), d[8],
                     None if d[6] is None else list(zip(d[2], d[6], d[9] or [None] * n))])

        box.requests.add(rid)
        try:
            yield self.replica  # routed here: the ingress's wait for a replica ends
            sub = self.engine.submit(request.token_ids, request.params, rid, on_delta)
            try:
                await sub.accepted
            except InvalidRequest as exc:
                raise APIError(400, str(exc), param=exc.param) from None
            yield ACCEPTED
            while not sub.done.done():
                await asyncio.wait([sub.done], timeout=ATTACH_TIMEOUT_S)
                if box.detached_for() > ATTACH_TIMEOUT_S:
                    raise APIError(503, "the ingress's token channel did not attach",
                                   code="unavailable")
            try:
                sub.done.result()
            except InvalidRequest as exc:  # refused by the core after the same check passed here
                raise APIError(400, str(exc), param=exc.param) from None
            except RuntimeError as exc:
                raise APIError(500, str(exc), code="internal_error") from None
        except (asyncio.CancelledError, GeneratorExit):  # caller gone: the engine aborts it
            self.cancelled += 1
            raise
        finally:
            self.engine.abort(rid)
            box.requests.discard(rid)
            self.outboxes.release(request.ingress)

    async def subscribe(self, channel: Subscription) -> AsyncIterator[list]:
        """The token channel of one ingress (deployments/token_channel.py)."""
        if channel.replica != self.replica:
            raise APIError(503, f"channel for replica {channel.replica} reached {self.replica}",
                           code="unavailable")
        async for batch in self.outboxes.read(channel.ingress):
            yield batch

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine process died is restarted."""
        if not getattr(self.engine, "alive", True):
            raise RuntimeError("the engine process died")

    def model_info(self) -> dict:
        """What the ingress validates requests against."""
        return {**self.engine.model_info(), "block_size": self.config.block_size,
                "backend": self.backend}

    def stats(self) -> dict:
        """Engine load, pool occupancy and throughput of this replica."""
        s = self.engine.stats()
        now = time.monotonic()
        while self._produced and self._produced[0][0] < now - RATE_WINDOW_S:
            self._produced.popleft()
        pool = s.pool
        return {"replica": self.replica, "backend": self.backend,
                "waiting": s.waiting, "running": s.running,
                "free_blocks": pool.free_blocks, "cached_blocks": pool.cached_blocks,
                "used_blocks": pool.used_blocks, "num_blocks": pool.num_blocks,
                "prefix_hit_tokens": pool.prefix_hit_tokens,
                "prefix_miss_tokens": pool.prefix_miss_tokens, "cancelled": self.cancelled,
                "channels": self.outboxes.attached,
                "tokens_per_s": sum(n for _, n in self._produced) / RATE_WINDOW_S}

    def record_routing_stats(self) -> dict:
        return self.stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        s = self.stats()
        return {"kv_used_fraction": s["used_blocks"] / s["num_blocks"],
                "waiting": float(s["waiting"]), "running": float(s["running"]),
                "channels": float(s["channels"])}

    async def _publish_loop(self) -> None:
        last, sent, busy = None, 0.0, True
        held: set[int] = set()  # this replica's cached blocks, as its events tell
        snapshot = True         # the index has not had our blocks yet
        while True:  # an idle engine is looked at every heartbeat / 4 (a CPU replica shares cores)
            await asyncio.sleep(self._period if busy else HEARTBEAT_S / 4)
            events = self.engine.drain_cache_events()
            for kind, h in events:
                (held.add if kind == "add" else held.discard)(h)
            stats = self.stats()
            busy = bool(events or stats["waiting"] or stats["running"])
            if snapshot or events or stats != last or time.monotonic() - sent > HEARTBEAT_S:
                try:
                    known = await self._index.update.remote(
                        self.replica, events, stats, sorted(held) if snapshot else None)
                    last, sent, snapshot = stats, time.monotonic(), not known
                except Exception as exc:  # index restarting: send all we hold once it is back
                    log.warning("could not publish cache events: %s", exc)
                    snapshot = True

    def __del__(self) -> None:
        self._publisher.cancel()
        self.engine.shutdown()
