"""The ingress side of one engine request: validate, send through the handle, stream, map errors.

:meth:`EngineClient.open` checks the prompt against the model's context (413) and max_tokens
(400), sends the request through the engine deployment's handle (whose router picks the
replica) and waits for the replica to accept it, so that every error a request can meet before
its first token becomes an HTTP status rather than a broken stream. The wait is bounded
(``ingress.admission_timeout_s``): a request no replica takes in time (all busy, or none ready
yet: also the first wait for the model's info) gets 503 with Retry-After rather than an
unbounded stall. Its tokens then arrive on the ingress's token channel from that replica
(:mod:`deployments.token_channel`), one
:class:`Stream` per choice (``n`` of them: one engine request and one ``generate`` call, whose
choices' chunks carry the ids of :func:`~optgptq.serving.protocol.choice_id`). A stream records
time to first token and inter-token latency, and cancels the engine request if its consumer
stops early (client disconnect) or closes it, which aborts it (every choice of it) on the
replica and frees its blocks. A response of several streams reads them through :func:`merged`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from typing import NamedTuple

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.serve_calls import TRANSPORT
from deployments.token_channel import RequestStream, TokenChannels
from optgptq.engine.sampling_params import SamplingParams
from optgptq.engine.sequence import InvalidRequest, check_request
from optgptq.serving.chat_template import ChatTemplate
from optgptq.serving.metrics import ServingMetrics
from optgptq.serving.openai_responses import add_usage, usage
from optgptq.serving.protocol import APIError, EngineRequest, choice_id

log = logging.getLogger("ray.serve")
INLINE_CHARS = 8192
"""Prompts up to this many characters are tokenized on the event loop (well under a
millisecond); longer ones on a worker thread."""


def api_error(exc: BaseException) -> APIError:
    """The client-facing error for anything the handle or a replica raised."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, APIError):
        exc = exc.cause
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BackPressureError):
        return APIError(429, "too many requests queued for the engine replicas; retry later",
                        code="queue_full")
    if isinstance(exc, (ActorDiedError, RayActorError, ActorUnavailableError)):
        return APIError(503, "the engine replica serving this request died; retry the request",
                        code="replica_died")
    if isinstance(exc, DeploymentUnavailableError):
        return APIError(503, "no engine replica is available", code="unavailable")
    return internal_error(exc)


def internal_error(exc: BaseException) -> APIError:
    """A 500 whose body says nothing of the internals (paths, processes, actors): the detail
    goes to the log under an id that the body gives."""
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s: %s", incident, "".join(traceback.format_exception(exc)))
    return APIError(500, f"internal error (incident {incident}; the server log has the detail)",
                    code="internal_error")


TokenLogprob = tuple[int, float, list[tuple[int, float]] | None]
"""A generated token's id, its logprob and, where asked for, its step's top ``(id, logprob)``."""


class Chunk(NamedTuple):
    text: str
    num_tokens: int
    finished: bool
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    """This chunk's tokens, where the request asked for logprobs."""


class _Call:
    """The ``generate`` call of one engine request, shared by its choices' streams: watched
    once (if it fails, so do they); cancelling it aborts every choice on the replica."""

    def __init__(self, states: list[RequestStream], forget) -> None:
        self.states = states
        self.response = states[0].response
        self.forget = forget  # a choice's id no longer awaits chunks
        self._watch = asyncio.get_running_loop().create_task(self._watch_call())

    async def _watch_call(self) -> None:
        """The call ends when the request does; if it fails, so do the streams."""
        try:
            async for _ in self.response:
                pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(api_error(exc))

    def _fail(self, error: APIError) -> None:
        for state in self.states:
            self.forget(state.request_id)
            state.fail(error)

    def cancel(self) -> None:
        """Abort the request; a choice still read by someone ends with an error (499)."""
        self.response.cancel()
        self._watch.cancel()
        self._fail(APIError(499, "the request was cancelled", code="cancelled"))


class Stream:
    """One choice of an accepted request as its consumer reads it; totals update as it goes."""

    def __init__(self, state: RequestStream, index: int, call: _Call, start: float,
                 metrics: ServingMetrics) -> None:
        self._state = state
        self.index = index
        self._call = call
        self._start = start
        self._metrics = metrics
        self._done = False
        self.request_id = ""

    def __getattr__(self, name: str):  # replica, prompt_tokens, completion_tokens, ...
        return getattr(self._state, name)

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        state, last, finished = self._state, None, False
        try:
            while not finished:
                c = await state.next_chunk()
                now = time.perf_counter()
                if last is None:
                    self._metrics.ttft.observe(now - self._start)
                else:
                    self._metrics.itl.observe(now - last)
                last, finished = now, c[3]
                yield Chunk(c[1], c[2], c[3], c[4], c[7])
            self._done = True
            first = self.index == 0  # a request's prompt counts once
            self._metrics.observe_finished(state.replica, state.prompt_tokens if first else 0,
                                           state.cached_tokens if first else 0,
                                           state.completion_tokens)
        finally:
            self._call.forget(state.request_id)
            if not finished:
                self.close()

    def close(self) -> None:
        """Give up on the request unless this choice finished (its consumer is gone): the
        replica aborts it, every choice of it. Idempotent."""
        if self._done:
            return
        self._done = True
        self._call.cancel()


class EngineClient:
    """Sends validated requests to the engine deployment through its handle."""

    def __init__(self, handle, tokenizer, metrics: ServingMetrics,
                 admission_timeout_s: float) -> None:
        self.handle = handle.options(stream=True, **TRANSPORT)
        self.info_handle = handle.options(**TRANSPORT)
        self.channels = TokenChannels(self.handle)
        self.tokenizer = tokenizer
        self.template = ChatTemplate(tokenizer)
        self.metrics = metrics
        self.admission_timeout_s = admission_timeout_s
        self._info: dict | None = None
        self._info_call: asyncio.Future | None = None

    async def prompt_ids(self, prompt: str | list[int] | list,
                         tools: list[dict] | None = None) -> list[int]:
        """One prompt of a validated request (a text, token ids, or chat messages with the
        request's tools) as token ids; a long text is tokenized on a worker thread, so that it
        does not hold up the other requests of this event loop."""
        if isinstance(prompt, str):
            size = len(prompt)
        elif prompt and not isinstance(prompt[0], int):
            if tools:
                self.template.check_tools()
            size = sum(len(m["content"]) for m in prompt) + len(json.dumps(tools or []))
        else:
            return list(prompt)
        if size <= INLINE_CHARS:
            return self.token_ids(prompt, tools)
        return await asyncio.to_thread(self.token_ids, prompt, tools)

    def token_ids(self, prompt: str | list[dict], tools: list[dict] | None = None) -> list[int]:
        """A text (special tokens added) or rendered chat messages (the chat template, with the
        generation prompt and the tools, :mod:`optgptq.serving.chat_template`) as token ids."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return self.template.token_ids(prompt, tools)

    def token_text(self, token_id: int) -> str:
        """One token's text, as logprobs report it."""
        return self.tokenizer.decode([token_id])

    async def model_info(self, timeout: float | None = None) -> dict:
        """The engine's model info (asked once, then cached). ``timeout``: how long to wait for
        a replica that can answer; then APIError 503 (the replicas are still starting)."""
        if self._info is not None:
            return self._info
        if self._info_call is None or self._info_call.done():
            self._info_call = asyncio.ensure_future(self.info_handle.model_info.remote())
        try:
            self._info = await asyncio.wait_for(asyncio.shield(self._info_call), timeout)
        except TimeoutError:
            raise APIError(503, "the engine replicas are still starting; retry shortly",
                           code="unavailable") from None
        except Exception as exc:
            raise api_error(exc) from None
        return self._info

    async def open(self, token_ids: list[int], params: SamplingParams) -> list[Stream]:
        """Send one request; the streams of its ``params.n`` choices once a replica took it."""
        start = time.perf_counter()
        info = await self.model_info(self.admission_timeout_s)
        try:  # the engine's own check, against the limits its replicas reported
            check_request(token_ids, params, info["limits"])
        except InvalidRequest as exc:
            too_long = exc.code == "context_length_exceeded" and exc.param == "prompt"
            raise APIError(413 if too_long else 400, str(exc), param=exc.param,
                           code=exc.code) from None
        rid = uuid.uuid4().hex
        state = RequestStream(rid)
        others = [RequestStream(choice_id(rid, j)) for j in range(1, params.n)]
        streams = self.channels.streams
        for s in (state, *others):  # before sending: the first chunks may beat the acceptance
            streams[s.request_id] = s
        try:  # backpressure can raise from remote() itself or from the acceptance
            state.response = self.handle.generate.remote(
                EngineRequest(rid, list(token_ids), params, self.channels.ingress))
            # bounded: the wait in Serve's queue for a replica; unbounded: the engine's
            # acceptance (at most one step away), which may still refuse it (400, 503)
            state.replica = await asyncio.wait_for(state.response.__anext__(),
                                                   self.admission_timeout_s)
            await state.response.__anext__()
        except BaseException as exc:
            if isinstance(exc, TimeoutError):
                exc = APIError(503, f"no engine replica took the request within "
                               f"{self.admission_timeout_s:g} s; retry shortly",
                               code="overloaded")
            for s in (state, *others):
                streams.pop(s.request_id, None)
            if state.response is not None:
                state.response.cancel()
            if isinstance(exc, asyncio.CancelledError):  # the client went away while we waited
                raise
            raise api_error(exc) from None
        self.channels.open(state.replica)
        for s in others:
            s.replica, s.response = state.replica, state.response
        call = _Call([state, *others], lambda r: streams.pop(r, None))
        return [Stream(s, j, call, start, self.metrics) for j, s in enumerate((state, *others))]


async def merged(streams: list[Stream]) -> AsyncIterator[tuple[int, Chunk]]:
    """The chunks of several streams as they come, each with its stream's index (one stream:
    read directly, no tasks)."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: Stream) -> None:
        try:
            async for chunk in stream:
                queue.put_nowait((i, chunk, None))
        except APIError as exc:
            queue.put_nowait((i, None, exc))
        queue.put_nowait((i, None, None))

    tasks = [asyncio.get_running_loop().create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                running -= 1
            else:
                yield i, chunk
    finally:
        for task in tasks:
            task.cancel()


def total_usage(streams: list[Stream]) -> dict:
    """The OpenAI usage of all of a response's streams: each request's prompt once (its first
    choice's), every choice's completion tokens."""
    total = usage(0, 0, 0)
    for s in streams:
        first = s.index == 0
        total = add_usage(total, usage(s.prompt_tokens if first else 0, s.completion_tokens,
                                       s.cached_tokens if first else 0))
    return total
