"""The ingress side of one engine request: validate, send through the handle, stream, map errors.

:meth:`EngineClient.open` checks the prompt against the model's context (413) and max_tokens
(400), sends the request through the engine deployment's handle (whose router picks the
replica) and waits for the first chunk, so that every error a request can meet before its first
token becomes an HTTP status rather than a broken stream. The returned :class:`RequestStream`
records time to first token and inter-token latency, and cancels the engine request if its
consumer stops early (client disconnect), which aborts it on the replica and frees its blocks.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from optgptq.engine.sampling_params import SamplingParams
from optgptq.serving.metrics import ServingMetrics
from optgptq.serving.protocol import APIError, EngineChunk, EngineRequest


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
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


class RequestStream:
    """Chunks of one engine request, the first already received; totals update as it goes."""

    def __init__(self, response, first: EngineChunk, start: float,
                 metrics: ServingMetrics) -> None:
        self._response = response
        self._first = first
        self._start = start
        self._metrics = metrics
        self.request_id = ""
        self.replica = first.replica
        self.prompt_tokens = first.num_prompt_tokens
        self.cached_tokens = first.num_cached_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    async def __aiter__(self) -> AsyncIterator[EngineChunk]:
        last = None
        chunk = self._first
        try:
            while True:
                now = time.perf_counter()
                if last is None:
                    self._metrics.ttft.observe(now - self._start)
                else:
                    self._metrics.itl.observe(now - last)
                last = now
                self.completion_tokens += chunk.num_tokens
                self.finish_reason = chunk.finish_reason
                yield chunk
                if chunk.finished:
                    self._metrics.observe_finished(self.replica, self.prompt_tokens,
                                                   self.cached_tokens, self.completion_tokens)
                    return
                try:
                    chunk = await self._response.__anext__()
                except StopAsyncIteration:
                    raise APIError(500, "engine stream ended early", code="internal_error")
                except Exception as exc:
                    raise api_error(exc) from None
        finally:
            if self.finish_reason is None:
                self._response.cancel()


class EngineClient:
    """Sends validated requests to the engine deployment through its handle."""

    def __init__(self, handle, tokenizer, metrics: ServingMetrics) -> None:
        self.handle = handle.options(stream=True)
        self.info_handle = handle
        self.tokenizer = tokenizer
        self.metrics = metrics
        self._info: dict | None = None

    def chat_token_ids(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]

    async def model_info(self) -> dict:
        if self._info is None:
            try:
                self._info = await self.info_handle.model_info.remote()
            except Exception as exc:
                raise api_error(exc) from None
        return self._info

    async def open(self, token_ids: list[int], params: SamplingParams) -> RequestStream:
        start = time.perf_counter()
        info = await self.model_info()
        limit = info["max_model_len"]
        if not token_ids:
            raise APIError(400, "prompt is empty", param="prompt", code="invalid_value")
        if not all(isinstance(t, int) and 0 <= t < info["vocab_size"] for t in token_ids):
            raise APIError(400, f"prompt token ids must be in [0, {info['vocab_size']})",
                           param="prompt", code="invalid_value")
        if len(token_ids) >= limit:
            raise APIError(413, f"prompt has {len(token_ids)} tokens; the model's context is "
                           f"{limit}, leaving no room to generate", param="prompt",
                           code="context_length_exceeded")
        if params.max_tokens is not None and len(token_ids) + params.max_tokens > limit:
            raise APIError(400, f"max_tokens={params.max_tokens} plus the prompt's "
                           f"{len(token_ids)} tokens exceeds the model's context of {limit}",
                           param="max_tokens", code="context_length_exceeded")
        request = EngineRequest(uuid.uuid4().hex, list(token_ids), params)
        response = None
        try:  # backpressure can raise from remote() itself or from the first chunk
            response = self.handle.generate.remote(request)
            first = await response.__anext__()
        except asyncio.CancelledError:  # the client went away while we waited
            if response is not None:
                response.cancel()
            raise
        except Exception as exc:  # the request failed: nothing left to cancel
            raise api_error(exc) from None
        return RequestStream(response, first, start, self.metrics)
