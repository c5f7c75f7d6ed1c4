"""The OpenAI-compatible HTTP API of an ingress replica (FastAPI, served by its uvicorn).

POST /v1/completions and /v1/chat/completions (``stream: true`` as server-sent events), GET
/v1/models, /health, /metrics (Prometheus text), /openapi.json (the request bodies' schemas
included). With API keys configured every route but /health (``ingress.auth_health``) and
/metrics (``ingress.auth_metrics``) needs ``Authorization: Bearer <key>`` (401 otherwise).

A body is checked before anything else reads it: its Content-Type must be JSON (415), its size
at most ``max_request_bytes`` (413), its JSON well formed and nested at most
:data:`MAX_DEPTH` levels (400); a large one is parsed on a worker thread. Errors are OpenAI
bodies: 400 (malformed JSON, missing, unknown, refused or wrong-typed fields, bad values), 401,
404 (unknown model or path), 413, 415, 429 (engine deployment's queue full), 503 (replica queue full,
replica died, nothing to serve yet) and 500 without internal detail (the log has it). With
``ingress.replica_header`` the ``x-optgptq-replica`` header names the replica that served the
request. A client that disconnects cancels the engine request, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from deployments.engine_client import internal_error, merged, total_usage
from optgptq.serving.openai_requests import ChatCompletionRequest, CompletionRequest
from optgptq.serving.openai_responses import (ChunkEncoder, choice, logprobs_body,
                                              response_body)
from optgptq.serving.protocol import APIError, invalid, new_id

MAX_DEPTH = 32
"""Deepest JSON nesting accepted; the APIs' bodies need 4."""
THREAD_BYTES = 64 << 10
"""Bodies larger than this are parsed and validated on a worker thread."""


RETRY_AFTER_S = 1


def error_response(exc: APIError) -> JSONResponse:
    """The OpenAI error body; 429 and 503 say when to retry."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status in (429, 503) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed ``limit`` bytes: from its
    Content-Length before reading, else while it streams in (chunked)."""
    def too_large(size: str) -> APIError:
        return APIError(413, f"request body is {size} bytes; the limit is {limit}",
                        code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(declared)
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large(f"more than {limit}")
        parts.append(part)
    return b"".join(parts)


def load_json(raw: bytes):
    """Parsed JSON, APIError 400 if malformed or nested deeper than MAX_DEPTH."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise APIError(400, f"JSON nested deeper than {MAX_DEPTH} levels",
                       code="invalid_json") from None
    except ValueError as exc:
        raise APIError(400, f"malformed JSON: {exc}", code="invalid_json") from None
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:  # only then can it be too deep
        level = [(data, 1)]
        while level:
            value, depth = level.pop()
            if depth > MAX_DEPTH:
                raise APIError(400, f"JSON nested deeper than {MAX_DEPTH} levels",
                               code="invalid_json")
            children = value.values() if isinstance(value, dict) else (
                value if isinstance(value, list) else ())
            level += [(c, depth + 1) for c in children if isinstance(c, (dict, list))]
    return data


def _body_schema(model: type[BaseModel]) -> dict:
    """OpenAPI ``requestBody`` for a route that parses its body itself."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {k: v for k, v in schema.items() if k != "$defs"}}}},
        "x-components": schema.get("$defs", {})}


def build_http_app(ingress) -> FastAPI:
    """The app of one ingress (:class:`deployments.ingress.Ingress`): its client, keys, model
    name, metrics and settings."""
    app = FastAPI(title="optgptq", docs_url=None, redoc_url=None, openapi_url=None)
    client, metrics, model_name = ingress.client, ingress.metrics, ingress.model_name
    keys, settings = ingress.keys, ingress.config

    def authorize(request: Request) -> str | None:
        return keys.tenant(request.headers.get("authorization"))

    @app.exception_handler(404)
    async def not_found(request: Request, exc) -> JSONResponse:
        return error_response(APIError(404, f"no route {request.method} {request.url.path}",
                                       code="not_found"))

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(internal_error(exc))

    @app.get("/health")
    async def health(request: Request) -> Response:
        if settings.auth_health:
            authorize(request)
        readiness = ingress.readiness
        if not readiness.ready:
            return error_response(APIError(503, readiness.why_not(), code="unavailable"))
        return JSONResponse({"status": "ok", "replicas": readiness.routable})

    model_card = {"id": model_name, "object": "model", "created": 0, "owned_by": "optgptq"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> dict:
        authorize(request)
        if model != model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                           f"{model_name!r}", param="model", code="model_not_found")
        return model_card

    @app.get("/metrics")
    async def metrics_text(request: Request) -> Response:
        if settings.auth_metrics:
            authorize(request)
        metrics.update_replicas(await ingress.replica_stats())
        return PlainTextResponse(metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def parse(request: Request, schema: type[BaseModel]) -> BaseModel:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json" and not kind.endswith("+json"):
            raise APIError(415, f"Content-Type must be application/json, got {kind!r}",
                           code="unsupported_media_type")
        raw = await read_body(request, ingress.max_request_bytes)

        def validate() -> BaseModel:
            try:
                return schema.model_validate(load_json(raw))
            except ValidationError as exc:
                raise invalid(exc) from None

        body = validate() if len(raw) <= THREAD_BYTES else await asyncio.to_thread(validate)
        if body.model != model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves "
                           f"{model_name!r}", param="model", code="model_not_found")
        return body

    async def open_all(body, chat: bool, tenant: str | None) -> tuple[list, list[str]]:
        """One engine request per prompt (all or none: on an error the opened ones are
        closed), a stream per choice (choice ``prompt_index * n + j``), and each choice's
        prompt text where ``echo`` asks for it."""
        params = body.sampling_params(tenant)
        streams, echoes = [], []
        try:
            tools = body.tool_spec.rendered() if chat and body.tool_spec else None
            for prompt in body.prompts:
                prompt = [m.rendered() for m in prompt] if chat else prompt
                ids = await client.prompt_ids(prompt, tools)
                streams += await client.open(ids, params)
                if not chat and body.echo:
                    echoes += [prompt if isinstance(prompt, str)
                               else client.tokenizer.decode(ids)] * params.n
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return streams, echoes

    async def sse(body, streams: list, echoes: list[str], rid: str, chat: bool
                  ) -> AsyncIterator[str]:
        encode = ChunkEncoder(rid, model_name, chat, body.include_usage,
                              body.tool_spec if chat else None)
        offsets = [len(e) for e in echoes] or [0] * len(streams)
        # a chat choice's role chunk goes out with its first token, not before the prefill:
        # clients time the first token by the first chunk
        started = [not chat] * len(streams)
        try:
            for i, echo in enumerate(echoes):
                yield encode.text(i, echo)
            async for i, chunk in merged(streams):
                logprobs = None
                if body.wants_logprobs and chunk.logprobs:
                    logprobs = logprobs_body(chat, chunk.logprobs, client.token_text, offsets[i])
                offsets[i] += len(chunk.text)
                events = encode.step(i, chunk.text, chunk.finished, chunk.finish_reason, logprobs)
                if not started[i]:
                    started[i] = True
                    events = encode.start(i) + events
                if events:
                    yield events
            if body.include_usage:
                yield encode.usage(total_usage(streams))
        except APIError as exc:  # headers are gone: report in-band, then end the stream
            yield f"data: {json.dumps(exc.body())}\n\n"
        finally:
            for stream in streams:
                stream.close()
        yield "data: [DONE]\n\n"

    async def whole(body, streams: list, echoes: list[str], rid: str, chat: bool) -> dict:
        choices = []
        try:
            for i, stream in enumerate(streams):
                text, tokens = "", []
                async for chunk in stream:
                    text += chunk.text
                    tokens += chunk.logprobs or []
                prefix = echoes[i] if echoes else ""
                logprobs = (logprobs_body(chat, tokens, client.token_text, len(prefix))
                            if body.wants_logprobs else None)
                choices.append(choice(chat, i, prefix + text, stream.finish_reason, logprobs,
                                      body.tool_spec if chat else None))
        finally:
            for stream in streams:
                stream.close()
        return response_body(rid, model_name, chat, choices, total_usage(streams))

    async def generate(request: Request, schema: type[BaseModel], chat: bool) -> Response:
        endpoint = request.url.path
        try:
            tenant = authorize(request)
            body = await parse(request, schema)
            streams, echoes = await open_all(body, chat, tenant)
        except APIError as exc:
            metrics.observe_request(endpoint, exc.status)
            return error_response(exc)
        rid = new_id("chatcmpl" if chat else "cmpl")
        headers = ({"x-optgptq-replica": ",".join(s.replica for s in streams if s.index == 0)}
                   if settings.replica_header else None)
        if body.stream:
            metrics.observe_request(endpoint, 200)
            return StreamingResponse(sse(body, streams, echoes, rid, chat), headers=headers,
                                     media_type="text/event-stream")
        try:
            result = await whole(body, streams, echoes, rid, chat)
        except APIError as exc:
            metrics.observe_request(endpoint, exc.status)
            return error_response(exc)
        metrics.observe_request(endpoint, 200)
        return JSONResponse(result, headers=headers)

    completion_doc, chat_doc = _body_schema(CompletionRequest), _body_schema(ChatCompletionRequest)

    @app.post("/v1/completions", openapi_extra=completion_doc)
    async def completions(request: Request) -> Response:
        return await generate(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=chat_doc)
    async def chat_completions(request: Request) -> Response:
        return await generate(request, ChatCompletionRequest, chat=True)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(_openapi(app))

    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema with the request bodies' shared definitions under components."""
    if app.openapi_schema is None:
        schema = app.openapi()
        shared = schema.setdefault("components", {}).setdefault("schemas", {})
        for path in schema["paths"].values():
            for operation in path.values():
                shared.update(operation.pop("x-components", {}))
    return app.openapi_schema
