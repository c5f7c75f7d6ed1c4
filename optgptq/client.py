"""Python client of the serving deployment: OpenAI-style HTTP and the gRPC service.

``HTTPClient("http://127.0.0.1:8000").chat("Hi")`` returns the OpenAI response body;
``stream=True`` yields text deltas as they arrive (server-sent events).
``GRPCClient("127.0.0.1:9000")`` calls ``optgptq.OptGPTQ/Generate`` and ``GenerateStream``.
Both send an API key where one is given or set in ``$OPTGPTQ_API_KEY``. HTTP needs only the
standard library; gRPC needs ``grpcio`` (the ``serve`` extra). Errors raise :class:`ClientError`
with the HTTP status (or gRPC code name) and the server's message.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any


API_KEY_ENV = "OPTGPTQ_API_KEY"


class ClientError(Exception):
    def __init__(self, status: int | str, message: str, body: dict | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.body = body or {}


def _messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None


class HTTPClient:
    """``api_key`` (default: $OPTGPTQ_API_KEY) is sent as ``Authorization: Bearer``."""

    def __init__(self, url: str = "http://127.0.0.1:8000", model: str = "smollm2",
                 timeout: float = 600.0, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        if _api_key(api_key):
            self.headers["Authorization"] = f"Bearer {_api_key(api_key)}"

    def _open(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=self.headers)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                err = json.loads(raw)
            except ValueError:
                raise ClientError(exc.code, raw.decode(errors="replace")) from None
            message = err.get("error", {}).get("message", str(err))
            raise ClientError(exc.code, message, err) from None

    def models(self) -> list[str]:
        with self._open("/v1/models") as r:
            return [m["id"] for m in json.load(r)["data"]]

    def complete(self, prompt: str | list[int], stream: bool = False,
                 **params: Any) -> dict | Iterator[str]:
        """POST /v1/completions; params are OpenAI fields (max_tokens, temperature, ...)."""
        return self._request("/v1/completions", {"prompt": prompt}, stream, params)

    def chat(self, prompt: str | list[dict], stream: bool = False,
             **params: Any) -> dict | Iterator[str]:
        """POST /v1/chat/completions with one user message or a message list."""
        return self._request("/v1/chat/completions", {"messages": _messages(prompt)}, stream,
                             params)

    def _request(self, path: str, body: dict, stream: bool, params: dict):
        body = {"model": self.model, **body, **params, "stream": stream}
        if not stream:
            with self._open(path, body) as r:
                return json.load(r)
        return self._events(self._open(path, body))

    def _events(self, response) -> Iterator[str]:
        with response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    raise ClientError(event["error"].get("code") or "error",
                                      event["error"]["message"], event)
                if not event["choices"]:  # the usage chunk (stream_options.include_usage)
                    continue
                choice = event["choices"][0]
                yield choice["delta"].get("content", "") if "delta" in choice else choice["text"]


class GRPCClient:
    """``api_key`` (default: $OPTGPTQ_API_KEY) is sent as ``authorization`` metadata."""

    def __init__(self, target: str = "127.0.0.1:9000", model: str = "smollm2",
                 timeout: float = 600.0, api_key: str | None = None) -> None:
        import grpc

        from optgptq.serving import optgptq_pb2, optgptq_pb2_grpc

        self._grpc, self._pb = grpc, optgptq_pb2
        self.channel = grpc.insecure_channel(target)
        self.stub = optgptq_pb2_grpc.OptGPTQStub(self.channel)
        self.model = model
        self.timeout = timeout
        key = _api_key(api_key)
        self.metadata = (("authorization", f"Bearer {key}"),) if key else ()

    def _request(self, prompt: str | list[dict], chat: bool, params: dict):
        if chat:
            messages = [self._pb.ChatMessage(**m) for m in _messages(prompt)]
            return self._pb.GenerateRequest(model=self.model, messages=messages, **params)
        return self._pb.GenerateRequest(model=self.model, prompt=prompt, **params)

    def generate(self, prompt: str | list[dict], chat: bool = False, **params: Any):
        """Generate (unary): a GenerateResponse with the whole text."""
        try:
            return self.stub.Generate(self._request(prompt, chat, params), timeout=self.timeout,
                                      metadata=self.metadata)
        except self._grpc.RpcError as exc:
            raise ClientError(exc.code().name, exc.details()) from None

    def stream(self, prompt: str | list[dict], chat: bool = False, **params: Any) -> Iterator:
        """GenerateStream: GenerateResponses with text deltas."""
        call = self.stub.GenerateStream(self._request(prompt, chat, params), timeout=self.timeout,
                                        metadata=self.metadata)
        try:
            yield from call
        except self._grpc.RpcError as exc:
            raise ClientError(exc.code().name, exc.details()) from None
        finally:
            call.cancel()

    def close(self) -> None:
        self.channel.close()
