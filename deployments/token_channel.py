"""Token channels: one stream per (ingress, engine replica) pair carrying all of its tokens.

Serve streams a call's results one message each. Streaming every request's tokens that way
costs one message per token per request through Serve's transport, ~100-200 us of Python on
each side (bench/results/serve-overhead-cpu.json), so an engine replica's process saturated at a
few thousand tokens/s. Here each request still goes through the engine deployment's handle
(routing, admission and backpressure, cancellation, replica-death detection stay Serve's), but
its tokens travel on a channel: one message per engine step per ingress, whatever the number of
requests.

Protocol:

1. The ingress registers the request's :class:`RequestStream`, then calls ``generate`` with an
   :class:`~optgptq.serving.protocol.EngineRequest` naming its ingress id. The replica yields
   its replica id at once, then ``"accepted"`` once the engine has taken the request (a
   refusal raises instead: an HTTP status), then nothing until the request ends; every output goes to that ingress's
   :class:`Outbox` on the replica.
2. The ingress keeps a channel open from every live replica (the router reports them,
   :func:`replicas_changed`) and opens one on an acceptance from a replica it has none to: a
   streaming ``subscribe`` call with a :class:`~optgptq.serving.protocol.Subscription`, which
   the router sends to exactly that replica. The outbox keeps what arrives before the channel
   attaches. Serve counts a channel as an ongoing call: the engine deployment's
   ``max_ongoing_requests`` has one slot more per ingress replica.
3. A channel message is a list of :data:`Chunk` lists ``[request_id, text, num_tokens,
   finished, finish_reason, num_prompt_tokens, num_cached_tokens, logprobs]``, one per request
   (per choice of a request with ``n`` > 1, ``request_id`` then being the choice's,
   :func:`~optgptq.serving.protocol.choice_id`) with new output, merged since the last message
   (:func:`merge`): a slow reader gets larger messages, not more. ``logprobs`` is None unless
   the request asked for them, else a list of ``(token_id, logprob, top)``, ``top`` the step's
   most likely ``(token_id, logprob)`` where the request asked for them, else None.
4. A broken channel is reopened while its replica lives or requests wait on it; a request whose
   ``generate`` call fails (replica died, engine error) fails on its own. A replica fails the requests of an
   ingress whose channel stays detached for ``ATTACH_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Iterable

from deployments.serve_calls import background
from optgptq.serving.protocol import Subscription

log = logging.getLogger("ray.serve")
ATTACH_TIMEOUT_S = 30.0
Chunk = list


def merge(into: list, chunk: Chunk) -> None:
    """Append ``chunk``'s output to the unread chunk ``into`` of the same request."""
    into[1] += chunk[1]
    into[2] += chunk[2]
    into[3], into[4], into[6] = chunk[3], chunk[4], chunk[6]
    if into[5] is None:
        into[5] = chunk[5]
    if chunk[7]:
        into[7] = (into[7] or []) + chunk[7]


class Outbox:
    """Replica side: one ingress's chunks, merged per request, until its channel takes them."""

    def __init__(self) -> None:
        self.chunks: dict[str, list] = {}
        self.ready = asyncio.Event()
        self.requests: set[str] = set()
        self.reader = 0           # the attached channel's number (0: none)
        self.detached_at = time.monotonic()

    def put(self, chunk: Chunk) -> None:
        c = self.chunks.get(chunk[0])
        if c is None:
            self.chunks[chunk[0]] = chunk
        else:
            merge(c, chunk)
        self.ready.set()

    def detached_for(self) -> float:
        return 0.0 if self.reader else time.monotonic() - self.detached_at


class Outboxes:
    """Replica side: the outboxes of every ingress with requests or a channel here."""

    def __init__(self) -> None:
        self.boxes: dict[str, Outbox] = {}
        self._readers = 0

    def get(self, ingress: str) -> Outbox:
        box = self.boxes.get(ingress)
        if box is None:
            box = self.boxes[ingress] = Outbox()
        return box

    def release(self, ingress: str) -> None:
        box = self.boxes.get(ingress)
        if box is not None and not box.requests and not box.reader and not box.chunks:
            del self.boxes[ingress]

    @property
    def attached(self) -> int:
        return sum(1 for b in self.boxes.values() if b.reader)

    async def read(self, ingress: str) -> AsyncIterator[list[Chunk]]:
        """A channel: an empty message once attached, then the chunks as they come. A newer
        channel of the same ingress replaces this one."""
        box = self.get(ingress)
        self._readers += 1
        me = box.reader = self._readers
        replaced, box.ready = box.ready, asyncio.Event()
        replaced.set()  # a reader this one replaces wakes up and leaves
        ready = box.ready
        if box.chunks:
            ready.set()
        try:
            yield []
            while True:
                await ready.wait()
                if box.reader != me:
                    return
                ready.clear()
                if box.chunks:
                    batch, box.chunks = list(box.chunks.values()), {}
                    yield batch
        finally:
            if box.reader == me:
                box.reader = 0
                box.detached_at = time.monotonic()
                self.release(ingress)


class RequestStream:
    """Ingress side: one request's chunks (merged while unread), its totals and its end."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.replica = ""
        self.response = None      # the generate call, once accepted
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.pending: list | None = None
        self.error: BaseException | None = None
        self.wake: asyncio.Future | None = None

    def put(self, chunk: Chunk) -> None:
        if self.pending is None:
            self.pending = list(chunk)
        else:
            merge(self.pending, chunk)
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
            self._wake()

    def _wake(self) -> None:
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)

    async def next_chunk(self) -> list:
        """The chunks that arrived since the last call, merged; raises the request's error."""
        while self.pending is None and self.error is None:
            self.wake = asyncio.get_running_loop().create_future()
            await self.wake
        if self.pending is None:
            raise self.error
        chunk, self.pending = self.pending, None
        if chunk[5] is not None:
            self.prompt_tokens = chunk[5]
        self.cached_tokens = chunk[6]
        self.completion_tokens += chunk[2]
        if chunk[3]:
            self.finish_reason = chunk[4]
        return chunk


_INGRESSES: weakref.WeakSet[TokenChannels] = weakref.WeakSet()


def replicas_changed(replicas: Iterable[str]) -> None:
    """The engine replicas now alive (from the router of this process): every ingress of the
    process keeps a channel from each (any thread)."""
    live = frozenset(replicas)
    for channels in list(_INGRESSES):
        try:
            channels.loop.call_soon_threadsafe(channels.follow, live)
        except RuntimeError:  # its loop is closed: that ingress serves nobody any more
            pass


class TokenChannels:
    """Ingress side: this ingress's channels (one per engine replica) and the streams waiting
    for their chunks. ``handle``: the engine deployment's streaming handle; create it on the
    event loop that serves the ingress."""

    def __init__(self, handle) -> None:
        self.ingress = uuid.uuid4().hex
        self.handle = handle
        self.loop = asyncio.get_running_loop()
        self.streams: dict[str, RequestStream] = {}
        self.replicas: frozenset[str] = frozenset()
        self._channels: dict[str, asyncio.Task] = {}
        _INGRESSES.add(self)

    def follow(self, replicas: frozenset[str]) -> None:
        """Open channels from new replicas; those of gone ones end once nothing waits."""
        self.replicas = replicas
        for replica in replicas:
            self.open(replica)

    def open(self, replica: str) -> None:
        """Make sure a channel from ``replica`` is open (or opening)."""
        if replica not in self._channels:
            self._channels[replica] = background(self._run(replica))

    async def _run(self, replica: str) -> None:
        backoff = 0.05
        try:
            while True:
                try:
                    async for batch in self.handle.subscribe.remote(
                            Subscription(self.ingress, replica)):
                        backoff = 0.05
                        for chunk in batch:
                            stream = (self.streams.pop(chunk[0], None) if chunk[3]
                                      else self.streams.get(chunk[0]))
                            if stream is not None:
                                stream.put(chunk)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the streams' own calls say if the replica is gone
                    log.info("token channel from %s broke: %s", replica, exc)
                if replica not in self.replicas and not any(
                        s.replica == replica for s in self.streams.values()):
                    return
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, 2.0)
        finally:
            self._channels.pop(replica, None)

    def close(self) -> None:
        for task in list(self._channels.values()):
            task.cancel()
