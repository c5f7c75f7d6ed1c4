"""A stand-in for an ingress replica (no Ray): the APIs of deployments/http_api.py and
grpc_api.py served over an engine client that records what reaches it and answers every
choice of every prompt with "hello" (or ``client.text``) in two chunks of one token each (ids 7 and 11, logprobs
-0.5 and -1.5; with top_logprobs N, the alternatives id + k at logprob - k for k < N; a token's
text is the letter of its id mod 26)."""

from __future__ import annotations

import types

from deployments.app import IngressConfig
from deployments.auth import APIKeys
from deployments.engine_client import Chunk
from optgptq.serving.metrics import ServingMetrics

KEY, OTHER = "sk-test-" + "a" * 24, "sk-test-" + "b" * 24


class FakeStream:
    replica = "replica-1"

    def __init__(self, ids: list[int], index: int, top_logprobs: int,
                 text: list[str], finish_reason: str = "length") -> None:
        self.finish_reason = finish_reason
        self.prompt_tokens, self.completion_tokens, self.cached_tokens = len(ids), 2, 0
        self.index, self.top_logprobs, self.text = index, top_logprobs, text
        self.closed = False

    def _token(self, token: int, logprob: float) -> tuple:
        top = [(token + k, logprob - k) for k in range(self.top_logprobs)]
        return token, logprob, top or None

    async def __aiter__(self):
        yield Chunk(self.text[0], 1, False, None, [self._token(7, -0.5)])
        yield Chunk(self.text[1], 1, True, self.finish_reason, [self._token(11, -1.5)])

    def close(self) -> None:
        self.closed = True


class FakeClient:
    """What the APIs call on the engine client; keeps every opened request's parameters."""

    def __init__(self) -> None:
        self.opened: list[tuple[list[int], object]] = []
        self.prompts: list = []
        self.tools: list = []
        self.text = ["he", "llo"]
        self.finish_reason = "length"
        """The two chunks every choice answers and its finish reason (tests may set others)."""
        self.fail: Exception | None = None

    tokenizer = types.SimpleNamespace(decode=lambda ids: "".join(chr(97 + i % 26) for i in ids))

    async def prompt_ids(self, prompt, tools=None) -> list[int]:
        self.prompts.append(prompt)
        self.tools.append(tools)
        if isinstance(prompt, str):
            return [ord(c) % 97 for c in prompt]
        if prompt and isinstance(prompt[0], dict):
            return [len(m["content"]) for m in prompt]
        return list(prompt)

    def token_text(self, token_id: int) -> str:
        return chr(97 + token_id % 26)

    async def open(self, ids, params):
        if self.fail is not None:
            raise self.fail
        self.opened.append((ids, params))
        return [FakeStream(ids, j, params.top_logprobs, self.text,
                           self.finish_reason) for j in range(params.n)]


def fake_ingress(keys: dict[str, str], **settings) -> types.SimpleNamespace:
    async def replica_stats():
        return {}
    config = IngressConfig(**settings)
    return types.SimpleNamespace(client=FakeClient(), metrics=ServingMetrics(), model_name="m",
                                 keys=APIKeys(keys), config=config,
                                 readiness=types.SimpleNamespace(ready=True, routable=1),
                                 max_request_bytes=config.max_request_bytes,
                                 replica_stats=replica_stats)
