"""Wire formats of the serving layer: OpenAI request/response bodies, errors, engine messages.

HTTP bodies follow the OpenAI completions and chat completions APIs (the subset this engine
implements; unknown fields are ignored as OpenAI clients send many). Values are checked strictly
before they reach the engine: text must be valid Unicode (a lone surrogate is a 400, not a
tokenizer crash), token ids are integers (``true`` is not token 1), numbers lie in ranges the
engine can take. ``cache_salt`` (vLLM's field) names a prefix-cache namespace: prompts share
cached blocks only under the same salt and API-key tenant (:func:`effective_salt`). Errors carry
an HTTP status and render as OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
``EngineRequest`` is what the ingress sends to an engine replica; ``Subscription`` opens the
token channel its outputs come back on.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationError

from optgptq.engine.sampling_params import SamplingParams

MAX_TOKENS_LIMIT = 1 << 20
"""Sanity bound on max_tokens before the model's context is known (a 422, not an allocation)."""

INT64 = (-(1 << 63), (1 << 64) - 1)
"""The seeds a generator takes (OpenAI's seed is a 64-bit integer)."""
MAX_SALT_CHARS = 256

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                404: "not_found_error", 413: "invalid_request_error",
                415: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error", 499: "cancelled", 500: "internal_error",
                503: "service_unavailable"}


class APIError(Exception):
    """An error with an HTTP status, rendered as an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def __reduce__(self):  # crosses Ray process boundaries intact
        return APIError, (self.status, self.message, self.param, self.code)


def _unicode(text: str) -> str:
    """Text the tokenizer can take: encodable as UTF-8 (JSON's ``\\ud800`` escapes can make
    lone surrogates, which are not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode ({exc.reason} at {exc.start})") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: StrictInt | None = Field(default=16, gt=0, le=MAX_TOKENS_LIMIT)
    """None: up to the model's context (OpenAI's meaning), bounded by the context check."""
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(default=0, ge=-1, le=MAX_TOKENS_LIMIT)
    seed: StrictInt | None = Field(default=None, ge=INT64[0], le=INT64[1])
    stop: Text | list[Text] | None = None
    ignore_eos: bool = False
    n: Literal[1] = 1
    stream: bool = False
    cache_salt: Text | None = Field(default=None, min_length=1, max_length=MAX_SALT_CHARS)

    def sampling_params(self, tenant: str | None = None) -> SamplingParams:
        """The engine's parameters (``tenant``: the API key's, for the cache salt); APIError 400
        naming the field if it rejects them."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature,
                                  top_k=self.top_k, top_p=self.top_p, seed=self.seed, stop=stop,
                                  ignore_eos=self.ignore_eos,
                                  cache_salt=effective_salt(tenant, self.cache_salt))
        except ValueError as exc:
            raise APIError(400, str(exc), param=str(exc).split()[0],
                           code="invalid_value") from None


class CompletionRequest(_Sampling):
    """POST /v1/completions: a text prompt or a list of token ids."""

    prompt: Text | list[Annotated[int, Field(strict=True, ge=0)]] = Field(min_length=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions: messages rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0, le=MAX_TOKENS_LIMIT)

    def sampling_params(self, tenant: str | None = None) -> SamplingParams:
        params = super().sampling_params(tenant)
        if self.max_completion_tokens is not None:
            params.max_tokens = self.max_completion_tokens
        return params


def invalid(exc: ValidationError) -> APIError:
    """422 naming the top-level field (OpenAI's ``param``) and the full location."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    return APIError(422, f"{'.'.join(loc) or 'body'}: {err['msg']}",
                    param=loc[0] if loc else None, code="invalid_value")


def effective_salt(tenant: str | None, salt: str | None) -> str | None:
    """The engine's cache salt: the tenant's namespace, then the request's own within it (a
    client cannot name another tenant's namespace)."""
    if tenant is None and salt is None:
        return None
    return f"{tenant or ''}\x00{salt or ''}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(rid: str, model: str, chat: bool, text: str, finish_reason: str | None,
                    usage: dict | None) -> dict:
    """A whole response (``usage`` given) or one streamed chunk (``usage`` None)."""
    if chat:
        key, value = ("message", {"role": "assistant", "content": text}) if usage is not None \
            else ("delta", {"content": text})
        choice = {"index": 0, key: value, "finish_reason": finish_reason}
        kind = "chat.completion" if usage is not None else "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        kind = "text_completion"
    body = {"id": rid, "object": kind, "created": int(time.time()), "model": model,
            "choices": [choice]}
    if usage is not None:
        body["usage"] = usage
    return body


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass
class EngineRequest:
    """One request from the ingress to an engine replica (the router reads ``token_ids``)."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    ingress: str = ""
    """The ingress whose token channel carries the outputs (deployments/token_channel.py)."""


@dataclass
class Subscription:
    """An ingress's token channel from one engine replica; the router sends it to ``replica``."""

    ingress: str
    replica: str
