"""The gRPC service of an ingress replica (``optgptq.OptGPTQ``: Generate, GenerateStream).

Served by the replica's ``grpc.aio`` server (:mod:`deployments.ingress`), which refuses a
message over ``max_request_bytes`` before decoding it. The handlers take the request's raw bytes
and decode them here, so a malformed message is INVALID_ARGUMENT (gRPC's own decoding would
answer UNKNOWN). With API keys configured the call's ``authorization`` metadata must hold
``Bearer <key>`` (UNAUTHENTICATED otherwise). Requests are validated as their HTTP twins are;
errors end the call with INVALID_ARGUMENT (400, 413, 415), NOT_FOUND (404),
RESOURCE_EXHAUSTED (429, or 503 for a full engine queue), UNAVAILABLE (503) or INTERNAL (500,
without internal detail), with the message as the status details. With
``ingress.replica_header`` each response names the replica that served the request. With
``n`` > 1, GenerateStream interleaves the choices' responses, each naming its choice (``index``);
Generate, whose one response has room for one choice, refuses it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError
from pydantic import ValidationError

from deployments.engine_client import TokenLogprob, internal_error, merged
from optgptq.serving import optgptq_pb2 as pb
from optgptq.serving.openai_requests import ChatCompletionRequest, CompletionRequest
from optgptq.serving.protocol import APIError, invalid, new_id

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
          415: grpc.StatusCode.INVALID_ARGUMENT,
          429: grpc.StatusCode.RESOURCE_EXHAUSTED}
SERVICE = "optgptq.OptGPTQ"
_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "seed", "cache_salt", "min_tokens",
             "presence_penalty", "frequency_penalty", "repetition_penalty", "n")
"""GenerateRequest fields passed on where set (else the request model's default)."""


def _json_field(name: str, text: str):
    """A ``*_json`` field's value; APIError 400 naming ``name`` unless it is a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise APIError(400, f"{name}: {name}_json is not JSON: {exc}", param=name,
                       code="invalid_value") from None
    if not isinstance(value, dict):
        raise APIError(400, f"{name}: {name}_json must be a JSON object", param=name,
                       code="invalid_value")
    return value


def status_code(exc: APIError) -> grpc.StatusCode:
    code = _CODES.get(exc.status)
    if code is None:
        code = (grpc.StatusCode.RESOURCE_EXHAUSTED if exc.code == "overloaded"
                else grpc.StatusCode.UNAVAILABLE if exc.status == 503
                else grpc.StatusCode.INTERNAL)
    return code


async def _fail(context: grpc.aio.ServicerContext, exc: APIError) -> NoReturn:
    await context.abort(status_code(exc), exc.message)


def grpc_handlers(service: "GRPCService") -> grpc.GenericRpcHandler:
    """The service's methods, taking raw request bytes (decoded by the servicer)."""
    encode = pb.GenerateResponse.SerializeToString
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Generate": grpc.unary_unary_rpc_method_handler(
            service.Generate, request_deserializer=None, response_serializer=encode),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            service.GenerateStream, request_deserializer=None, response_serializer=encode)})


class GRPCService:
    """The servicer: ``ingress`` gives the engine client, keys, served model name, settings."""

    def __init__(self, ingress) -> None:
        self.client = ingress.client
        self.keys = ingress.keys
        self.model_name = ingress.model_name
        self.replica_field = ingress.config.replica_header

    async def Generate(self, raw: bytes,
                       context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        (stream,), echo = await self._open(raw, context, unary=True)
        text, tokens = echo, []
        try:
            async for chunk in stream:
                text += chunk.text
                tokens += chunk.logprobs or []
        except APIError as exc:
            await _fail(context, exc)
        return self._response(stream, text, tokens)

    async def GenerateStream(self, raw: bytes, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.GenerateResponse]:
        streams, echo = await self._open(raw, context, unary=False)
        if echo:
            for stream in streams:
                yield self._response(stream, echo, [])
        try:
            async for i, chunk in merged(streams):
                if chunk.text or chunk.finished:
                    yield self._response(streams[i], chunk.text, chunk.logprobs or [])
        except APIError as exc:
            await _fail(context, exc)
        finally:
            for stream in streams:
                stream.close()

    async def _open(self, raw: bytes, context: grpc.aio.ServicerContext, unary: bool):
        try:
            metadata = dict(context.invocation_metadata() or ())
            tenant = self.keys.tenant(metadata.get("authorization"))
            try:
                request = pb.GenerateRequest.FromString(raw)
            except DecodeError as exc:
                raise APIError(400, f"malformed GenerateRequest: {exc}") from None
            if request.model != self.model_name:
                raise APIError(404, f"model {request.model!r} does not exist; this server "
                               f"serves {self.model_name!r}", param="model",
                               code="model_not_found")
            if bool(request.prompt) == bool(request.messages):
                raise APIError(400, "give exactly one of prompt and messages", param="prompt")
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            params = {name: getattr(request, name) for name in _OPTIONAL
                      if request.HasField(name)}
            params.update(stop=list(request.stop), ignore_eos=request.ignore_eos,
                          logit_bias={str(k): v for k, v in request.logit_bias.items()})
            for name in ("response_format", "structured_outputs"):
                if request.HasField(name + "_json"):
                    params[name] = _json_field(name, getattr(request, name + "_json"))
            top = request.top_logprobs
            if top and not request.logprobs:
                raise APIError(400, "top_logprobs: needs logprobs", param="top_logprobs")
            if unary and params.get("n", 1) > 1:
                raise APIError(400, "n: Generate answers one choice; use GenerateStream, whose "
                               "responses name their choice (index)", param="n")
            if messages:
                if request.echo:
                    raise APIError(400, "echo: only for a prompt", param="echo")
                body = ChatCompletionRequest(model=request.model, messages=messages,
                                             logprobs=request.logprobs, top_logprobs=top,
                                             **params)
                prompt = [m.rendered() for m in body.messages]
            else:
                body = CompletionRequest(model=request.model, prompt=request.prompt,
                                         echo=request.echo,
                                         logprobs=top if request.logprobs else None, **params)
                prompt = body.prompt
            ids = await self.client.prompt_ids(prompt)
            streams = await self.client.open(ids, body.sampling_params(tenant))
        except ValidationError as exc:
            await _fail(context, invalid(exc))
        except APIError as exc:
            await _fail(context, exc)
        except Exception as exc:  # a bug: no detail to the caller, all of it to the log
            await _fail(context, internal_error(exc))
        rid = new_id("grpc")
        for stream in streams:
            stream.request_id = rid
        return streams, (request.prompt if request.echo else "")

    def _response(self, stream, text: str, tokens: list[TokenLogprob]) -> pb.GenerateResponse:
        token_text = self.client.token_text
        logprobs = [pb.TokenLogprob(token_id=t, token=token_text(t), logprob=lp, top=[
            pb.TopLogprob(token_id=i, token=token_text(i), logprob=v) for i, v in top or ()])
            for t, lp, top in tokens]
        return pb.GenerateResponse(id=stream.request_id, index=stream.index, text=text,
                                   logprobs=logprobs,
                                   finish_reason=stream.finish_reason or "",
                                   prompt_tokens=stream.prompt_tokens,
                                   completion_tokens=stream.completion_tokens,
                                   cached_tokens=stream.cached_tokens,
                                   replica=stream.replica if self.replica_field else "")
