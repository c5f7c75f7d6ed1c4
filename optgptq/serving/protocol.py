"""Wire formats of the serving layer: errors, checked text, cache salts, engine messages.

Errors carry an HTTP status and render as OpenAI's ``{"error": {"message", "type", "param",
"code"}}``; a request body's validation error is a 400 naming the field, as OpenAI answers
(:func:`invalid`). ``Text`` is text the tokenizer can take (a lone surrogate is refused, not a
tokenizer crash). ``cache_salt`` (vLLM's field) names a prefix-cache namespace: prompts share
cached blocks only under the same salt and API-key tenant (:func:`effective_salt`).
``EngineRequest`` is what the ingress sends to an engine replica; ``Subscription`` opens the
token channel its outputs come back on, where each of a request's ``n`` choices has its own id
(:func:`choice_id`). The OpenAI bodies themselves are in
:mod:`optgptq.serving.openai_requests` and :mod:`optgptq.serving.openai_responses`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import AfterValidator, ValidationError

from optgptq.engine.sampling_params import SamplingParams

MAX_TOKENS_LIMIT = 1 << 20
"""Sanity bound on max_tokens before the model's context is known (a 400, not an allocation)."""

INT64 = (-(1 << 63), (1 << 64) - 1)
"""The seeds a generator takes (OpenAI's seed is a 64-bit integer)."""
MAX_SALT_CHARS = 256

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                404: "not_found_error", 413: "invalid_request_error",
                415: "invalid_request_error",
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


def invalid(exc: ValidationError) -> APIError:
    """400 naming the top-level field (OpenAI's ``param``) and the full location."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc) or "body"
    message = "unknown parameter" if err["type"] == "extra_forbidden" else err["msg"]
    return APIError(400, f"{where}: {message}", param=loc[0] if loc else None,
                    code="invalid_value")


def effective_salt(tenant: str | None, salt: str | None) -> str | None:
    """The engine's cache salt: the tenant's namespace, then the request's own within it (a
    client cannot name another tenant's namespace)."""
    if tenant is None and salt is None:
        return None
    return f"{tenant or ''}\x00{salt or ''}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def choice_id(request_id: str, index: int) -> str:
    """The token channel's id of choice ``index`` of an engine request: the request's own id
    for choice 0 (the only one of most requests), ``request_id#index`` for the others."""
    return request_id if index == 0 else f"{request_id}#{index}"


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
