"""``AsyncLLMEngine``: the engine core in a background thread, streamed to asyncio callers.

The serving layer calls ``async for out in engine.generate(prompt, params, request_id)`` and
receives one :class:`RequestOutput` per step that produced text (``delta_text``,
``delta_token_ids``) until ``finished``. One thread owns the engine: requests and aborts reach it
through a queue, outputs go back to each caller's event loop. Invalid requests raise
``ValueError`` to their caller only; a failing step fails the requests of that batch and the loop
goes on. A caller that stops iterating (client gone, task cancelled) aborts its request, which
frees its blocks at once.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from optgptq.config import EngineConfig
from optgptq.engine.llm_engine import EngineStats, LLMEngine, RequestOutput
from optgptq.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, record_cache_events: bool = False) -> None:
        self.engine = LLMEngine(config, record_cache_events=record_cache_events)
        self.tokenizer = self.engine.tokenizer
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stopped = threading.Event()
        self._cache_events: collections.deque[tuple[str, int]] = collections.deque()
        self._thread = threading.Thread(target=self._loop, name="optgptq-engine", daemon=True)
        self._thread.start()

    # -- caller side (any event loop) ----------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        if self._stopped.is_set():
            raise RuntimeError("engine is shut down")
        request_id = request_id or f"async-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future = loop.create_future()
        stream = _Stream(loop, asyncio.Queue())
        self._inbox.put(("add", request_id, prompt, params or SamplingParams(), stream, accepted))
        finished = False
        try:
            await accepted  # raises the request's ValueError, if any
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def model_info(self) -> dict:
        """What requests are validated against: context length, pool size, vocabulary."""
        e = self.engine
        return {"max_model_len": e.max_model_len, "num_blocks": e.pool.num_blocks,
                "vocab_size": e.runner.hf_config.vocab_size}

    def drain_cache_events(self) -> list[tuple[str, int]]:
        """Block-pool ``("add" | "evict", hash)`` events since the last call, in order (needs
        ``record_cache_events``); safe to call from any thread."""
        events = []
        while self._cache_events:
            events.append(self._cache_events.popleft())
        return events

    def shutdown(self) -> None:
        self._stopped.set()
        self._inbox.put(("stop",))
        self._thread.join(timeout=30)

    # -- engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopped.is_set():
            block = not self.engine.has_unfinished_requests()
            try:
                self._handle(self._inbox.get(block=block, timeout=0.5 if block else None))
                while True:
                    self._handle(self._inbox.get_nowait())
            except queue.Empty:
                pass
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # keep serving: fail only the requests in flight
                log.exception("engine step failed; failing in-flight requests")
                for rid in list(self._streams):
                    self.engine.abort_request(rid)
                    self._send(rid, RuntimeError(f"engine step failed: {exc}"), final=True)
                continue
            self._cache_events.extend(self.engine.pool.drain_events())
            for out in outputs:
                self._send(out.request_id, out, final=out.finished)
        for rid in list(self._streams):
            self._send(rid, RuntimeError("engine is shut down"), final=True)

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "add":
            _, rid, prompt, params, stream, accepted = msg
            try:
                self.engine.add_request(prompt, params, rid)
            except ValueError as exc:
                stream.loop.call_soon_threadsafe(_resolve, accepted, exc)
                return
            self._streams[rid] = stream
            stream.loop.call_soon_threadsafe(_resolve, accepted, None)
        elif msg[0] == "abort":
            self.engine.abort_request(msg[1])
            self._streams.pop(msg[1], None)

    def _send(self, rid: str, item, final: bool) -> None:
        stream = self._streams.pop(rid, None) if final else self._streams.get(rid)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)


def _resolve(fut: asyncio.Future, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)
