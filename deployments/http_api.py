"""The OpenAI-compatible HTTP API of an ingress replica (FastAPI, served by its uvicorn).

POST /v1/completions and /v1/chat/completions (``stream: true`` as server-sent events), GET
/v1/models, /health, /metrics (Prometheus text). Errors are OpenAI bodies with 400 (malformed
JSON, bad values), 404 (unknown model or path), 413 (body or prompt too large), 422 (missing or
wrong-typed fields), 429 (engine deployment's queue full), 503 (replica queue full, replica died,
nothing to serve yet). The ``x-optgptq-replica`` header names the replica that served the
request. A client that disconnects cancels the engine request, which frees its blocks.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from optgptq.serving.protocol import (APIError, ChatCompletionRequest, CompletionRequest,
                                      completion_body, invalid, new_id, usage)


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class EventEncoder:
    """Server-sent events of one streamed response: the chunk body is rendered once, and each
    event only encodes its text (a JSON dump per token was the ingress's largest cost)."""

    _MARK = "\u0001optgptq\u0001"

    def __init__(self, rid: str, model: str, chat: bool) -> None:
        self.rid, self.model, self.chat = rid, model, chat
        body = json.dumps(completion_body(rid, model, chat, self._MARK, None, None))
        self.head, _, self.tail = body.partition(json.dumps(self._MARK))

    def __call__(self, text: str, finish_reason: str | None) -> str:
        if finish_reason is None:
            return f"data: {self.head}{json.dumps(text)}{self.tail}\n\n"
        body = completion_body(self.rid, self.model, self.chat, text, finish_reason, None)
        return f"data: {json.dumps(body)}\n\n"


def build_http_app(ingress) -> FastAPI:
    """The app of one ingress (:class:`deployments.ingress.Ingress`): its client, model name,
    metrics and request size limit."""
    app = FastAPI(title="optgptq", docs_url=None, redoc_url=None)
    client, metrics, model_name = ingress.client, ingress.metrics, ingress.model_name

    @app.exception_handler(404)
    async def not_found(request: Request, exc) -> JSONResponse:
        return error_response(APIError(404, f"no route {request.method} {request.url.path}",
                                       code="not_found"))

    @app.get("/health")
    async def health() -> Response:
        if not ingress.ready:
            return error_response(APIError(503, "no engine replica is ready yet",
                                           code="unavailable"))
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "optgptq"}]}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        metrics.update_replicas(await ingress.index.replica_stats.remote())
        return PlainTextResponse(metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def parse(request: Request, schema: type[BaseModel]) -> BaseModel:
        raw = await request.body()
        if len(raw) > ingress.max_request_bytes:
            raise APIError(413, f"request body is {len(raw)} bytes; the limit is "
                           f"{ingress.max_request_bytes}", code="request_too_large")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise APIError(400, f"malformed JSON: {exc}", code="invalid_json") from None
        try:
            body = schema.model_validate(data)
        except ValidationError as exc:
            raise invalid(exc) from None
        if body.model != model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves "
                           f"{model_name!r}", param="model", code="model_not_found")
        return body

    async def sse(stream, rid: str, chat: bool) -> AsyncIterator[str]:
        event = EventEncoder(rid, model_name, chat)
        try:
            async for chunk in stream:
                reason = chunk.finish_reason if chunk.finished else None
                if chunk.text or reason:
                    yield event(chunk.text, reason)
        except APIError as exc:  # headers are gone: report in-band, then end the stream
            yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"

    async def generate(request: Request, schema: type[BaseModel], chat: bool) -> Response:
        endpoint = request.url.path
        try:
            body = await parse(request, schema)
            ids = client.token_ids(body, chat)
            stream = await client.open(ids, body.sampling_params())
        except APIError as exc:
            metrics.observe_request(endpoint, exc.status)
            return error_response(exc)
        rid = new_id("chatcmpl" if chat else "cmpl")
        headers = {"x-optgptq-replica": stream.replica}
        if body.stream:
            metrics.observe_request(endpoint, 200)
            return StreamingResponse(sse(stream, rid, chat), headers=headers,
                                     media_type="text/event-stream")
        try:
            text = "".join([chunk.text async for chunk in stream])
        except APIError as exc:
            metrics.observe_request(endpoint, exc.status)
            return error_response(exc)
        metrics.observe_request(endpoint, 200)
        return JSONResponse(completion_body(rid, model_name, chat, text, stream.finish_reason,
                                            usage(stream.prompt_tokens, stream.completion_tokens,
                                                  stream.cached_tokens)),
                            headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, ChatCompletionRequest, chat=True)

    return app
