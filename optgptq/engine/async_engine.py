"""``AsyncLLMEngine``: an engine core stepping off the caller's event loop, for asyncio callers.

The core runs its loop (:mod:`optgptq.engine.core_loop`) in a background thread of this process,
or with ``process=True`` in a child process (:mod:`optgptq.engine.core_process`), which is how
the serving replicas run it: there the core never waits for the serving process's interpreter
lock, nor it for the core's. Two ways to follow a request:

- ``async for out in engine.generate(prompt, params, request_id)``: :class:`RequestOutput`
  deltas (``delta_text``, ``delta_token_ids``; ``text`` and ``token_ids`` so far) until
  ``finished`` (with ``n`` choices: each choice's, ``out.index`` naming it, until all finished).
  A delta arriving before its consumer took the previous one of its choice is merged into it,
  so a slow consumer gets larger deltas, never a growing queue, and never holds the core back.
- ``sub = engine.submit(prompt, params, request_id, on_delta)``: ``on_delta`` receives every raw
  :data:`~optgptq.engine.core_loop.Delta` on the caller's loop; ``await sub.accepted`` (raises
  :class:`~optgptq.engine.sequence.InvalidRequest` for an invalid request), ``await sub.done``
  (once every choice finished). For callers that forward many requests' outputs together (the
  serving replicas' token channels).

A prompt of token ids is checked on submission against the core's
:class:`~optgptq.engine.sequence.RequestLimits` (``check_request``, the check the core runs
when it takes the request) and accepted at once: its caller learns the request's fate without
waiting for the core's current step to end (a prefill step can take seconds). Text prompts are
accepted when the core has tokenized and checked them.

The core sends one batch per step; it reaches each caller's event loop in one
``call_soon_threadsafe`` per loop. A failing step fails the requests of that batch
(``RuntimeError``) and the loop goes on. Leaving ``generate`` early, or :meth:`abort`, aborts a
request, which frees its blocks at once. If the child process dies, every request fails and
:attr:`alive` turns false.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable

from optgptq.config import EngineConfig
from optgptq.engine import core_loop
from optgptq.engine.block_pool import PoolStats
from optgptq.engine.outputs import EngineStats, RequestOutput
from optgptq.engine.sampling_params import SamplingParams
from optgptq.engine.sequence import InvalidRequest, check_request


class Submission:
    """One request in flight: ``accepted`` and ``done`` futures, its deltas to ``on_delta``;
    done once each of its ``choices`` sent its finishing delta."""

    __slots__ = ("request_id", "loop", "on_delta", "accepted", "done", "unfinished")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop,
                 on_delta: Callable[[tuple], None], choices: int = 1) -> None:
        self.request_id = request_id
        self.loop = loop
        self.on_delta = on_delta
        self.accepted: asyncio.Future = loop.create_future()
        self.done: asyncio.Future = loop.create_future()
        self.unfinished = choices

    def _accept(self) -> None:
        if not self.accepted.done():
            self.accepted.set_result(None)

    def _put(self, delta: tuple) -> None:
        self._accept()
        self.on_delta(delta)
        if delta[3]:
            self.unfinished -= 1
            if not self.unfinished and not self.done.done():
                self.done.set_result(None)

    def _fail(self, error: BaseException) -> None:
        for fut in (self.accepted, self.done):
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved: nobody need await both to avoid a warning


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, record_cache_events: bool = False,
                 core: str = "native", core_options: dict | None = None,
                 process: bool = False) -> None:
        self._subs: dict[str, Submission] = {}
        self._ids = itertools.count()
        self._in_transit = 0          # adds sent that no batch has answered yet
        self._lock = threading.Lock()
        self._cache_events: deque[tuple[str, int]] = deque()
        self._closed = False
        self.alive = True
        if process:
            from optgptq.engine.core_process import CoreProcess

            self._process = CoreProcess(core, config, core_options, record_cache_events,
                                        self._on_batch)
            self._send = self._process.send
            self._info = self._process.model_info
            self.tokenizer = None
        else:
            engine = core_loop.build_core(core, config, core_options, record_cache_events)
            self._process = None
            self._inbox: queue.Queue = queue.Queue()
            self._send = self._inbox.put
            self._info = core_loop.model_info(engine)
            self.tokenizer = engine.tokenizer
            self._thread = threading.Thread(target=self._run_thread, args=(engine,),
                                            name="optgptq-engine", daemon=True)
            self._thread.start()
        n = self._info["num_blocks"]
        self._stats = EngineStats(0, 0, 0, PoolStats(n, n, 0, 0, 0, 0, 0))

    # -- caller side (any event loop) ----------------------------------------------------
    def submit(self, prompt: str | list[int], params: SamplingParams | None,
               request_id: str, on_delta: Callable[[tuple], None]) -> Submission:
        """Queue a request whose deltas go to ``on_delta`` (on the calling loop)."""
        if self._closed or not self.alive:
            raise RuntimeError("engine is shut down" if self._closed else "engine process died")
        if request_id in self._subs:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params or SamplingParams()
        sub = Submission(request_id, asyncio.get_running_loop(), on_delta, params.n)
        if not isinstance(prompt, str):
            try:
                check_request(prompt, params, self._info["limits"])
            except InvalidRequest as exc:
                sub._fail(exc)
                return sub
            sub._accept()
        self._subs[request_id] = sub
        with self._lock:
            self._in_transit += 1
        self._send(("add", request_id, prompt, params))
        sub.done.add_done_callback(lambda _: self._subs.pop(request_id, None))
        return sub

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        request_id = request_id or f"async-{next(self._ids)}"
        pending: dict[int, list] = {}  # per choice, at most one merged delta not yet taken
        wake: list[asyncio.Future] = []

        def on_delta(delta: tuple) -> None:
            if delta[10] in pending:
                _merge(pending[delta[10]], delta)
            else:
                pending[delta[10]] = list(delta)
            if wake and not wake[0].done():
                wake[0].set_result(None)

        sub = self.submit(prompt, params, request_id, on_delta)
        choices = [_SoFar(request_id, prompt) for _ in range(sub.unfinished)]
        unfinished = len(choices)
        try:
            while unfinished:
                if not pending:
                    wake[:] = [sub.loop.create_future()]
                    await asyncio.wait([wake[0], sub.done], return_when=asyncio.FIRST_COMPLETED)
                    if not pending:
                        sub.done.result()  # raises the request's error
                        continue
                index = next(iter(pending))  # the choice waiting longest
                d = pending.pop(index)
                yield choices[index].add(d)
                unfinished -= bool(d[3])
        finally:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request (no-op once it finished); its blocks are freed at once."""
        sub = self._subs.pop(request_id, None)
        if sub is not None and not sub.done.done() and not self._closed and self.alive:
            self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        """The core's stats after its last turn; requests still in transit count as waiting."""
        s = self._stats
        return EngineStats(s.waiting + self._in_transit, s.running, s.preemptions, s.pool)

    def model_info(self) -> dict:
        """What requests are validated against: context length, pool size, vocabulary."""
        return dict(self._info)

    def drain_cache_events(self) -> list[tuple[str, int]]:
        """Block-pool ``("add" | "evict", hash)`` events since the last call, in order (needs
        ``record_cache_events``); safe to call from any thread."""
        events = []
        while self._cache_events:
            events.append(self._cache_events.popleft())
        return events

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._process is not None:
            self._process.close()
        else:
            self._send(("stop",))
            self._thread.join(timeout=30)

    # -- batches from the core (its thread, or the child's reader thread) ------------------
    def _run_thread(self, engine) -> None:
        def receive(block: bool) -> list[tuple]:
            commands = [self._inbox.get()] if block else []
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    return commands

        core_loop.run(engine, receive, self._on_batch)

    def _on_batch(self, batch: tuple | None) -> None:
        items: list[tuple[Submission, str, object]] = []
        if batch is None:  # the child process is gone
            self.alive = False
            error = RuntimeError("engine is shut down" if self._closed else "engine process died")
            items = [(s, "fail", error) for s in list(self._subs.values())]
        else:
            accepted, deltas, errors, stats, events = batch
            with self._lock:
                self._in_transit -= len(accepted) + sum(e[1] == "invalid" for e in errors)
            self._stats = stats
            self._cache_events.extend(events)
            subs = self._subs
            items += [(s, "accept", None) for rid in accepted if (s := subs.get(rid))]
            items += [(s, "put", d) for d in deltas if (s := subs.get(d[0]))]
            items += [(s, "fail", InvalidRequest(message, param) if kind == "invalid"
                       else RuntimeError(message))
                      for rid, kind, message, param in errors if (s := subs.get(rid))]
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for item in items:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, group in by_loop.items():
            try:
                loop.call_soon_threadsafe(_apply, group)
            except RuntimeError:  # that loop is closed: nobody is waiting there any more
                pass


def _apply(items: list) -> None:
    for sub, what, arg in items:
        if what == "put":
            sub._put(arg)
        elif what == "accept":
            sub._accept()
        else:
            sub._fail(arg)


class _SoFar:
    """One choice's output so far, for :meth:`AsyncLLMEngine.generate`."""

    def __init__(self, request_id: str, prompt: str | list[int]) -> None:
        self.request_id = request_id
        self.prompt = prompt if isinstance(prompt, str) else None
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list = []
        self.prompt_ids: list[int] = []

    def add(self, d: list) -> RequestOutput:
        self.text += d[1]
        self.token_ids += d[2]
        self.logprobs += d[6] or []
        self.top_logprobs += d[9] or []
        if d[7] is not None:
            self.prompt_ids = d[7]
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, self.text,
                             list(self.token_ids), d[1], d[2], d[3], d[4], d[5],
                             list(self.logprobs) if d[6] is not None else None, d[8],
                             list(self.top_logprobs) if d[9] is not None else None, d[10])


def _merge(into: list, delta: tuple) -> None:
    """Append ``delta`` to an undelivered delta of the same choice."""
    into[1] += delta[1]
    into[2] = into[2] + delta[2]
    into[3:6] = delta[3:6]
    into[8] = delta[8]
    for slot in (6, 9):
        if delta[slot] is not None:
            into[slot] = (into[slot] or []) + delta[slot]
    if into[7] is None:
        into[7] = delta[7]
