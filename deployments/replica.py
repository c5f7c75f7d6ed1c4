"""Engine replica: one engine (one accelerator or a CPU share, one paged KV pool).

The engine is this project's :class:`~optgptq.engine.async_engine.AsyncLLMEngine` (``backend:
native``, stepping in a background thread) or vLLM's async engine
(:class:`~optgptq.serving.vllm_engine.VLLMEngine`, ``backend: vllm``, its engine core in a child
process); both offer the same calls, so everything below holds for either. With vLLM, cache
events are vLLM's KV cache events mapped onto the router's block hashes, and the stats come from
vLLM's scheduler. :meth:`EngineReplica.generate` streams one
request's text deltas as :class:`~optgptq.serving.protocol.EngineChunk`. A request that stops
being consumed (client gone, caller cancelled) is aborted by the engine and its blocks freed.
Admission is bounded: beyond ``max_waiting`` requests queued in the engine the replica answers
503 instead of growing its queue (Serve's ``max_ongoing_requests`` and ``max_queued_requests``
bound the layers above). Every ``publish_period_s`` a background task sends the block pool's
cache events and the engine stats to the router actor; the same stats feed Serve's routing stats
(:meth:`record_routing_stats`) and the KV-pressure autoscaling policy
(:meth:`record_autoscaling_stats`).
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
from optgptq.serving.vllm_engine import VLLMEngine
from optgptq.serving.protocol import APIError, EngineChunk, EngineRequest

log = logging.getLogger("ray.serve")
RATE_WINDOW_S = 10.0
HEARTBEAT_S = 2.0


class EngineReplica:
    def __init__(self, engine: dict, index, max_waiting: int = 64,
                 publish_period_s: float = 0.1, backend: str = "native",
                 vllm_args: dict | None = None) -> None:
        self.config = EngineConfig.from_dict(engine)
        self.backend = backend
        if backend == "vllm":
            self.engine = VLLMEngine(self.config, vllm_args, record_cache_events=True)
        elif backend == "native":
            self.engine = AsyncLLMEngine(self.config, record_cache_events=True)
        else:
            raise ValueError(f"backend must be native or vllm, got {backend!r}")
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.max_waiting = max_waiting
        self._index = index
        self._period = publish_period_s
        self._produced: deque[tuple[float, int]] = deque()  # (time, tokens) for tokens/s
        self.cancelled = 0
        self._publisher = asyncio.get_running_loop().create_task(self._publish_loop())

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """Stream one request; raises APIError 400 (invalid) or 503 (queue full)."""
        if self.engine.stats().waiting >= self.max_waiting:
            raise APIError(503, f"replica queue is full ({self.max_waiting} waiting requests)",
                           code="overloaded")
        stream = self.engine.generate(request.token_ids, request.params, request.request_id)
        try:
            async for out in stream:
                self._produced.append((time.monotonic(), len(out.delta_token_ids)))
                yield EngineChunk(self.replica, out.delta_text, len(out.delta_token_ids),
                                  out.finished, out.finish_reason, len(out.prompt_token_ids),
                                  out.num_cached_tokens)
        except ValueError as exc:
            raise APIError(400, str(exc), param=_param_of(str(exc))) from None
        except (asyncio.CancelledError, GeneratorExit):  # caller gone: the engine aborts it
            self.cancelled += 1
            raise
        finally:
            await stream.aclose()

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
                "tokens_per_s": sum(n for _, n in self._produced) / RATE_WINDOW_S}

    def record_routing_stats(self) -> dict:
        return self.stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        s = self.stats()
        return {"kv_used_fraction": s["used_blocks"] / s["num_blocks"],
                "waiting": float(s["waiting"]), "running": float(s["running"])}

    async def _publish_loop(self) -> None:
        last, sent = None, 0.0
        while True:
            await asyncio.sleep(self._period)
            events = self.engine.drain_cache_events()
            stats = self.stats()
            if events or stats != last or time.monotonic() - sent > HEARTBEAT_S:
                try:
                    await self._index.update.remote(self.replica, events, stats)
                    last, sent = stats, time.monotonic()
                except Exception as exc:  # index restarting: its entry refills from new events
                    log.warning("could not publish cache events: %s", exc)

    def __del__(self) -> None:
        self._publisher.cancel()
        self.engine.shutdown()


def _param_of(message: str) -> str | None:
    for name in ("max_tokens", "prompt", "temperature", "top_p", "top_k", "seed", "stop"):
        if message.startswith(name) or f" {name}" in message:
            return name
    return None
