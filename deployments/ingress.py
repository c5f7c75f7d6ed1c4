"""Ingress: the OpenAI-compatible HTTP API and the gRPC service, in front of the engine replicas.

HTTP (FastAPI through Serve's proxy): POST /v1/completions and /v1/chat/completions (``stream:
true`` as server-sent events), GET /v1/models, /health, /metrics (Prometheus text). gRPC (Serve's
gRPC proxy, ``optgptq.OptGPTQ``): Generate and GenerateStream. Both paths validate and tokenize
here, then send an :class:`~optgptq.serving.protocol.EngineRequest` through the engine
deployment's handle, whose router (:mod:`deployments.router`) picks the replica.

Errors are OpenAI bodies with 400 (malformed JSON, bad values), 404 (unknown model or path),
413 (body or prompt too large), 422 (missing or wrong-typed fields), 429 (engine deployment's
queue full), 503 (replica queue full, replica died, nothing to serve); gRPC maps them to
INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED and UNAVAILABLE. The response's
``x-optgptq-replica`` header (gRPC: the ``replica`` field) names the replica that served it.
A client that disconnects cancels the engine request, which aborts it and frees its blocks.
"""

import json
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from transformers import AutoTokenizer

from deployments.engine_client import EngineClient
from optgptq.serving import optgptq_pb2 as pb
from optgptq.serving.metrics import ServingMetrics
from optgptq.serving.protocol import (APIError, ChatCompletionRequest, CompletionRequest,
                                      completion_body, new_id, usage)

app = FastAPI(title="optgptq", docs_url=None, redoc_url=None)
_GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
               413: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
               429: grpc.StatusCode.RESOURCE_EXHAUSTED}


# Module-level helpers come before the class: serve.ingress captures the class when it is
# decorated, and helpers defined after it were missing in the replicas (NameError).


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@app.exception_handler(404)
async def _not_found(request: Request, exc) -> JSONResponse:
    return _error(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))


def _invalid(exc: ValidationError) -> APIError:
    """422 naming the top-level field (OpenAI's ``param``) and the full location."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    return APIError(422, f"{'.'.join(loc) or 'body'}: {err['msg']}",
                    param=loc[0] if loc else None, code="invalid_value")


def _grpc_params(request: pb.GenerateRequest) -> dict:
    params = {name: getattr(request, name) for name in
              ("max_tokens", "temperature", "top_p", "top_k", "seed") if request.HasField(name)}
    return {**params, "stop": list(request.stop), "ignore_eos": request.ignore_eos}


def _grpc_fail(grpc_context, exc: APIError) -> NoReturn:
    code = _GRPC_CODES.get(exc.status)
    if code is None:
        code = (grpc.StatusCode.RESOURCE_EXHAUSTED if exc.code == "overloaded"
                else grpc.StatusCode.UNAVAILABLE)
    grpc_context.set_code(code)
    grpc_context.set_details(exc.message)
    raise exc


@serve.ingress(app)
class Ingress:
    def __init__(self, engine, index, model_name: str, model_path: str,
                 max_request_bytes: int) -> None:
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.metrics = ServingMetrics()
        self.client = EngineClient(engine, tokenizer, self.metrics)
        self.index = index
        self.model_name = model_name
        self.max_request_bytes = max_request_bytes

    # -- HTTP --------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                            "created": 0, "owned_by": "optgptq"}]}

    @app.get("/metrics")
    async def metrics(self) -> Response:
        self.metrics.update_replicas(await self.index.replica_stats.remote())
        return PlainTextResponse(self.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._http(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._http(request, ChatCompletionRequest, chat=True)

    async def _http(self, request: Request, schema: type[BaseModel], chat: bool) -> Response:
        endpoint = request.url.path
        try:
            body = await self._parse(request, schema)
            stream = await self.client.open(self._token_ids(body, chat), body.sampling_params())
        except APIError as exc:
            self.metrics.observe_request(endpoint, exc.status)
            return _error(exc)
        rid = new_id("chatcmpl" if chat else "cmpl")
        headers = {"x-optgptq-replica": stream.replica}
        if body.stream:
            self.metrics.observe_request(endpoint, 200)
            return StreamingResponse(self._sse(stream, rid, chat), headers=headers,
                                     media_type="text/event-stream")
        try:
            text = "".join([chunk.text async for chunk in stream])
        except APIError as exc:
            self.metrics.observe_request(endpoint, exc.status)
            return _error(exc)
        self.metrics.observe_request(endpoint, 200)
        return JSONResponse(completion_body(rid, self.model_name, chat, text, stream.finish_reason,
                                            usage(stream.prompt_tokens, stream.completion_tokens,
                                                  stream.cached_tokens)),
                            headers=headers)

    async def _sse(self, stream, rid: str, chat: bool) -> AsyncIterator[str]:
        try:
            async for chunk in stream:
                reason = chunk.finish_reason if chunk.finished else None
                if chunk.text or reason:
                    body = completion_body(rid, self.model_name, chat, chunk.text, reason, None)
                    yield f"data: {json.dumps(body)}\n\n"
        except APIError as exc:  # headers are gone: report in-band, then end the stream
            yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"

    async def _parse(self, request: Request, schema: type[BaseModel]) -> BaseModel:
        raw = await request.body()
        if len(raw) > self.max_request_bytes:
            raise APIError(413, f"request body is {len(raw)} bytes; the limit is "
                           f"{self.max_request_bytes}", code="request_too_large")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise APIError(400, f"malformed JSON: {exc}", code="invalid_json") from None
        try:
            body = schema.model_validate(data)
        except ValidationError as exc:
            raise _invalid(exc) from None
        self._check_model(body.model)
        return body

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")

    def _token_ids(self, body, chat: bool) -> list[int]:
        if chat:
            return self.client.chat_token_ids([m.model_dump() for m in body.messages])
        if isinstance(body.prompt, str):
            return self.client.tokenizer.encode(body.prompt, add_special_tokens=True)
        return list(body.prompt)

    # -- gRPC --------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        stream = await self._grpc_open(request, grpc_context)
        try:
            text = "".join([chunk.text async for chunk in stream])
        except APIError as exc:
            _grpc_fail(grpc_context, exc)
        return self._grpc_response(stream, text)

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        stream = await self._grpc_open(request, grpc_context)
        try:
            async for chunk in stream:
                if chunk.text or chunk.finished:
                    yield self._grpc_response(stream, chunk.text)
        except APIError as exc:
            _grpc_fail(grpc_context, exc)

    async def _grpc_open(self, request: pb.GenerateRequest, grpc_context):
        try:
            self._check_model(request.model)
            if bool(request.prompt) == bool(request.messages):
                raise APIError(400, "give exactly one of prompt and messages", param="prompt")
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            params = _grpc_params(request)
            body = (ChatCompletionRequest(model=request.model, messages=messages, **params)
                    if messages else
                    CompletionRequest(model=request.model, prompt=request.prompt, **params))
            ids = self._token_ids(body, chat=bool(messages))
            stream = await self.client.open(ids, body.sampling_params())
        except ValidationError as exc:
            _grpc_fail(grpc_context, _invalid(exc))
        except APIError as exc:
            _grpc_fail(grpc_context, exc)
        stream.request_id = new_id("grpc")
        return stream

    @staticmethod
    def _grpc_response(stream, text: str) -> pb.GenerateResponse:
        return pb.GenerateResponse(id=stream.request_id, text=text,
                                   finish_reason=stream.finish_reason or "",
                                   prompt_tokens=stream.prompt_tokens,
                                   completion_tokens=stream.completion_tokens,
                                   cached_tokens=stream.cached_tokens, replica=stream.replica)
