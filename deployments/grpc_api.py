"""The gRPC service of an ingress replica (``optgptq.OptGPTQ``: Generate, GenerateStream).

Served by the replica's ``grpc.aio`` server (:mod:`deployments.ingress`). Requests are validated
as their HTTP twins are; errors end the call with INVALID_ARGUMENT (400, 413, 422), NOT_FOUND
(404), RESOURCE_EXHAUSTED (429, or 503 for a full engine queue) or UNAVAILABLE (503), with the
message as the status details. Each response names the replica that served the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
from pydantic import ValidationError

from optgptq.serving import optgptq_pb2 as pb
from optgptq.serving.protocol import (APIError, ChatCompletionRequest, CompletionRequest,
                                      invalid, new_id)

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
          429: grpc.StatusCode.RESOURCE_EXHAUSTED}


def status_code(exc: APIError) -> grpc.StatusCode:
    code = _CODES.get(exc.status)
    if code is None:
        code = (grpc.StatusCode.RESOURCE_EXHAUSTED if exc.code == "overloaded"
                else grpc.StatusCode.UNAVAILABLE if exc.status == 503
                else grpc.StatusCode.INTERNAL)
    return code


async def _fail(context: grpc.aio.ServicerContext, exc: APIError) -> NoReturn:
    await context.abort(status_code(exc), exc.message)


class GRPCService:
    """The servicer: ``ingress`` gives the engine client and the served model's name."""

    def __init__(self, ingress) -> None:
        self.client = ingress.client
        self.model_name = ingress.model_name

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        stream = await self._open(request, context)
        try:
            text = "".join([chunk.text async for chunk in stream])
        except APIError as exc:
            await _fail(context, exc)
        return self._response(stream, text)

    async def GenerateStream(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.GenerateResponse]:
        stream = await self._open(request, context)
        try:
            async for chunk in stream:
                if chunk.text or chunk.finished:
                    yield self._response(stream, chunk.text)
        except APIError as exc:
            await _fail(context, exc)

    async def _open(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            if request.model != self.model_name:
                raise APIError(404, f"model {request.model!r} does not exist; this server "
                               f"serves {self.model_name!r}", param="model",
                               code="model_not_found")
            if bool(request.prompt) == bool(request.messages):
                raise APIError(400, "give exactly one of prompt and messages", param="prompt")
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            params = {name: getattr(request, name) for name in
                      ("max_tokens", "temperature", "top_p", "top_k", "seed")
                      if request.HasField(name)}
            params.update(stop=list(request.stop), ignore_eos=request.ignore_eos)
            body = (ChatCompletionRequest(model=request.model, messages=messages, **params)
                    if messages else
                    CompletionRequest(model=request.model, prompt=request.prompt, **params))
            ids = self.client.token_ids(body, chat=bool(messages))
            stream = await self.client.open(ids, body.sampling_params())
        except ValidationError as exc:
            await _fail(context, invalid(exc))
        except APIError as exc:
            await _fail(context, exc)
        stream.request_id = new_id("grpc")
        return stream

    @staticmethod
    def _response(stream, text: str) -> pb.GenerateResponse:
        return pb.GenerateResponse(id=stream.request_id, text=text,
                                   finish_reason=stream.finish_reason or "",
                                   prompt_tokens=stream.prompt_tokens,
                                   completion_tokens=stream.completion_tokens,
                                   cached_tokens=stream.cached_tokens, replica=stream.replica)
