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

Tool calling (chat messages only) is /v1/chat/completions' (:mod:`optgptq.serving.openai_tools`,
:mod:`optgptq.serving.tool_calls`): the request's ``tools``, ``tool_choice_mode`` /
``tool_choice_function``, ``parallel_tool_calls`` and the messages' ``tool_calls`` and
``tool_call_id`` become that endpoint's fields and are validated by its request model; the
output is parsed for calls the same way. Generate answers the content as ``text`` and every
call in ``tool_calls``; GenerateStream sends the content and the calls in output order, each
call in one response once its block is complete, and the finish reason (``tool_calls`` where
the output ended with calls) on the last.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError
from pydantic import ValidationError

from deployments.engine_client import Chunk, TokenLogprob, internal_error, merged
from optgptq.serving import optgptq_pb2 as pb
from optgptq.serving.openai_requests import ChatCompletionRequest, CompletionRequest
from optgptq.serving.openai_tools import ToolSpec
from optgptq.serving.protocol import APIError, invalid, new_id
from optgptq.serving.tool_calls import ParsedCall, ToolCallParser, whole
from optgptq.serving.tool_calls import finish_reason as tool_finish

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
          415: grpc.StatusCode.INVALID_ARGUMENT,
          429: grpc.StatusCode.RESOURCE_EXHAUSTED}
SERVICE = "optgptq.OptGPTQ"
_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "seed", "cache_salt", "min_tokens",
             "presence_penalty", "frequency_penalty", "repetition_penalty", "n")
"""GenerateRequest fields passed on where set (else the request model's default)."""


def _json_object(param: str, field: str, text: str) -> dict:
    """A JSON-text field's value; APIError 400 naming ``param`` unless it is a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise APIError(400, f"{param}: {field} is not JSON: {exc}", param=param,
                       code="invalid_value") from None
    if not isinstance(value, dict):
        raise APIError(400, f"{param}: {field} must be a JSON object", param=param,
                       code="invalid_value")
    return value


def _messages(request: pb.GenerateRequest) -> list[dict]:
    """The chat messages as /v1/chat/completions takes them (an assistant message's empty
    content next to tool calls is no content)."""
    messages = []
    for m in request.messages:
        message: dict = {"role": m.role,
                         "content": m.content if m.content or not m.tool_calls else None}
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in m.tool_calls]
        if m.HasField("tool_call_id"):
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    return messages


def _tool(tool: pb.Tool) -> dict:
    """One tool as /v1/chat/completions takes it."""
    function: dict = {"name": tool.name}
    if tool.HasField("description"):
        function["description"] = tool.description
    if tool.HasField("parameters_json"):
        function["parameters"] = _json_object("tools", f"{tool.name}: parameters_json",
                                              tool.parameters_json)
    if tool.HasField("strict"):
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def _tool_fields(request: pb.GenerateRequest) -> dict:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` as /v1/chat/completions takes
    them, those the request sets."""
    fields: dict = {}
    if request.tools:
        fields["tools"] = [_tool(t) for t in request.tools]
    choice = request.WhichOneof("tool_choice")
    if choice == "tool_choice_mode":
        fields["tool_choice"] = request.tool_choice_mode
    elif choice == "tool_choice_function":
        fields["tool_choice"] = {"type": "function",
                                 "function": {"name": request.tool_choice_function}}
    if request.HasField("parallel_tool_calls"):
        fields["parallel_tool_calls"] = request.parallel_tool_calls
    return fields


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
        (stream,), echo, tools = await self._open(raw, context, unary=True)
        text, tokens = echo, []
        try:
            async for chunk in stream:
                text += chunk.text
                tokens += chunk.logprobs or []
        except APIError as exc:
            await _fail(context, exc)
        if tools is None:
            return self._response(stream, text, tokens, stream.finish_reason)
        content, calls = whole(text, tools.names)
        reason = tool_finish(stream.finish_reason, len(calls), tools.name is not None)
        return self._response(stream, content or "", tokens, reason, calls)

    async def GenerateStream(self, raw: bytes, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.GenerateResponse]:
        streams, echo, tools = await self._open(raw, context, unary=False)
        if echo:
            for stream in streams:
                yield self._response(stream, echo, [], None)
        parsers = [ToolCallParser(tools.names) for _ in streams] if tools is not None else None
        try:
            async for i, chunk in merged(streams):
                if parsers is not None:
                    for response in self._parsed(streams[i], parsers[i], chunk, tools):
                        yield response
                elif chunk.text or chunk.finished:
                    yield self._response(streams[i], chunk.text, chunk.logprobs or [],
                                         chunk.finish_reason if chunk.finished else None)
        except APIError as exc:
            await _fail(context, exc)
        finally:
            for stream in streams:
                stream.close()

    def _parsed(self, stream, parser: ToolCallParser, chunk: Chunk,
                tools: ToolSpec) -> list[pb.GenerateResponse]:
        """A chunk's responses with tools: one per piece of content or call, in output order;
        its logprobs and the finish reason on the last (one more response if there is none)."""
        events = parser.feed(chunk.text) + (parser.finish() if chunk.finished else [])
        out = [self._response(stream, "", [], None, [e]) if isinstance(e, ParsedCall)
               else self._response(stream, e, [], None) for e in events]
        if chunk.finished or chunk.logprobs:
            if not out:
                out.append(self._response(stream, "", [], None))
            last = out[-1]
            last.logprobs.extend(self._logprobs(chunk.logprobs or []))
            if chunk.finished:
                last.finish_reason = tool_finish(chunk.finish_reason, parser.calls,
                                                 tools.name is not None) or ""
        return out

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
            messages = _messages(request)
            params = {name: getattr(request, name) for name in _OPTIONAL
                      if request.HasField(name)}
            tool_fields = _tool_fields(request)
            if tool_fields and not messages:
                raise APIError(400, "tools: tool calling needs messages (chat), not a prompt",
                               param="tools", code="invalid_value")
            params.update(stop=list(request.stop), ignore_eos=request.ignore_eos,
                          logit_bias={str(k): v for k, v in request.logit_bias.items()})
            for name in ("response_format", "structured_outputs"):
                if request.HasField(name + "_json"):
                    params[name] = _json_object(name, name + "_json",
                                                getattr(request, name + "_json"))
            top = request.top_logprobs
            if top and not request.logprobs:
                raise APIError(400, "top_logprobs: needs logprobs", param="top_logprobs")
            if unary and params.get("n", 1) > 1:
                raise APIError(400, "n: Generate answers one choice; use GenerateStream, whose "
                               "responses name their choice (index)", param="n")
            tools = None
            if messages:
                if request.echo:
                    raise APIError(400, "echo: only for a prompt", param="echo")
                body = ChatCompletionRequest(model=request.model, messages=messages,
                                             logprobs=request.logprobs, top_logprobs=top,
                                             **params, **tool_fields)
                prompt = [m.rendered() for m in body.messages]
                tools = body.tool_spec
            else:
                body = CompletionRequest(model=request.model, prompt=request.prompt,
                                         echo=request.echo,
                                         logprobs=top if request.logprobs else None, **params)
                prompt = body.prompt
            sampling = body.sampling_params(tenant)
            ids = await self.client.prompt_ids(prompt, tools.rendered() if tools else None)
            streams = await self.client.open(ids, sampling)
        except ValidationError as exc:
            await _fail(context, invalid(exc))
        except APIError as exc:
            await _fail(context, exc)
        except Exception as exc:  # a bug: no detail to the caller, all of it to the log
            await _fail(context, internal_error(exc))
        rid = new_id("grpc")
        for stream in streams:
            stream.request_id = rid
        return (streams, (request.prompt if request.echo else ""),
                tools if tools is not None and tools.parses else None)

    def _logprobs(self, tokens: list[TokenLogprob]) -> list[pb.TokenLogprob]:
        token_text = self.client.token_text
        return [pb.TokenLogprob(token_id=t, token=token_text(t), logprob=lp, top=[
            pb.TopLogprob(token_id=i, token=token_text(i), logprob=v) for i, v in top or ()])
            for t, lp, top in tokens]

    def _response(self, stream, text: str, tokens: list[TokenLogprob], reason: str | None,
                  calls: Sequence[ParsedCall] = ()) -> pb.GenerateResponse:
        return pb.GenerateResponse(
            id=stream.request_id, index=stream.index, text=text, logprobs=self._logprobs(tokens),
            finish_reason=reason or "", prompt_tokens=stream.prompt_tokens,
            completion_tokens=stream.completion_tokens, cached_tokens=stream.cached_tokens,
            replica=stream.replica if self.replica_field else "",
            tool_calls=[pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments)
                        for c in calls])
