"""The OpenAI request bodies this server takes: every field implemented or refused by name.

``POST /v1/completions`` (:class:`CompletionRequest`) and ``POST /v1/chat/completions``
(:class:`ChatCompletionRequest`) follow OpenAI's APIs, plus vLLM's extras ``top_k``,
``ignore_eos``, ``min_tokens``, ``repetition_penalty`` and ``cache_salt``. Nothing a client
sends is dropped silently:

- a field this server implements is validated strictly (text must be valid Unicode, token ids
  integers, numbers in ranges the engine can take);
- a field of OpenAI's API that it does not implement is refused with a 400 naming it and saying
  why (:data:`REFUSED`), unless its value asks for nothing (``best_of: 1``, ``tools: []``,
  ``response_format: {"type": "text"}``, ...), which is what the server does anyway;
- any other field is refused as unknown (400).

``n`` choices per prompt come from one engine request (one prefill); with a list of prompts,
choice ``index`` is ``prompt_index * n + j``. ``logit_bias`` maps token ids (as JSON object keys)
to biases in [-100, 100]; ids beyond the model's vocabulary are a 400 once the ingress knows it.
Chat ``top_logprobs`` (0..20) needs ``logprobs: true``; completions ``logprobs: N`` (0..5) gives
the chosen tokens' logprobs and the N most likely alternatives of each step.

Structured output: OpenAI's ``response_format`` or vLLM's extra ``structured_outputs``, not
both (:mod:`optgptq.serving.openai_structured`).

Chat messages (:mod:`optgptq.serving.chat_messages`) take the roles ``system``, ``developer``
(as system), ``user``, ``assistant`` (with ``tool_calls``) and ``tool`` (with ``tool_call_id``);
content is a string or a list of text parts. Tool calling (chat only): ``tools``,
``tool_choice`` and ``parallel_tool_calls`` (:mod:`optgptq.serving.openai_tools`).
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Any

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt,
                      field_validator, model_validator)

from optgptq.engine.sampling_params import (MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, REPETITION_RANGE,
                                            SamplingParams)
from optgptq.engine.structured import StructuredSpec
from optgptq.serving.chat_messages import ChatMessage
from optgptq.serving.openai_structured import ResponseFormat, StructuredOutputs, output_format
from optgptq.serving.openai_tools import Tool, ToolChoice, ToolSpec
from optgptq.serving.protocol import (INT64, MAX_SALT_CHARS, MAX_TOKENS_LIMIT, APIError, Text,
                                      effective_salt)

MAX_PROMPTS = 64
"""Prompts one /v1/completions request may carry (each is its own engine request)."""
MAX_CHOICES = 128
"""Choices one request may ask for (prompts times ``n``)."""
MAX_COMPLETION_LOGPROBS = 5
"""The most alternatives completions' ``logprobs`` may ask for (OpenAI's limit)."""


def _none(value: Any) -> bool:
    return value is None or value is False or value == 0 or value == [] or value == {}


REFUSED: dict[str, tuple[Any, str]] = {
    # field: (the values that ask for nothing, why any other value is refused)
    "best_of": (lambda v: v in (None, 1), "best_of > 1 is not supported: ask for n choices "
                                           "with logprobs and rank them"),
    # tool calling is a chat feature (ChatCompletionRequest's fields); on /v1/completions:
    "tools": (_none, "tools are for /v1/chat/completions"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "tools are for /v1/chat/completions"),
    "parallel_tool_calls": (lambda v: True, ""),  # only meaningful with tools (refused there)
    "functions": (_none, "function calling is not supported"),
    "function_call": (lambda v: v in (None, "none"), "function calling is not supported"),
    "suffix": (_none, "suffix (insertion) is not supported by this server's models"),
    "stream_options": (lambda v: v is None or (isinstance(v, dict)
                                               and set(v) <= {"include_usage"}),
                       "stream_options supports include_usage only"),
    "modalities": (lambda v: v in (None, ["text"]), "text is the only output modality"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "prediction": (lambda v: v is None, "predicted outputs are not supported"),
    "reasoning_effort": (lambda v: v is None, "reasoning_effort needs a reasoning model"),
    "verbosity": (lambda v: v is None, "verbosity is not supported"),
    "web_search_options": (lambda v: v is None, "web search is not supported"),
    "store": (lambda v: v in (None, False), "this server stores no completions"),
    "metadata": (_none, "metadata is stored with completions, which this server does not store"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "there is one service tier"),
    "user": (lambda v: v is None, "user is not recorded by this server; omit it"),
    "safety_identifier": (lambda v: v is None, "safety_identifier is not recorded; omit it"),
    "prompt_cache_key": (lambda v: v is None, "use cache_salt to choose a cache namespace"),
}
"""OpenAI fields without an implementation here (REFUSED[name][0]: values that are no-ops)."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False
    """A last chunk with the usage of the whole request (and ``"usage": null`` on the others)."""


Penalty = Annotated[StrictFloat, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
Bias = Annotated[StrictFloat, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text
    max_tokens: StrictInt | None = Field(default=16, gt=0, le=MAX_TOKENS_LIMIT)
    """None: up to the model's context (OpenAI's meaning), bounded by the context check."""
    min_tokens: StrictInt = Field(default=0, ge=0, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(default=0, ge=-1, le=MAX_TOKENS_LIMIT)
    seed: StrictInt | None = Field(default=None, ge=INT64[0], le=INT64[1])
    stop: Text | list[Text] | None = Field(default=None, max_length=16)
    ignore_eos: StrictBool = False
    n: StrictInt = Field(default=1, ge=1, le=MAX_CHOICES)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: StrictFloat = Field(default=1.0, ge=REPETITION_RANGE[0],
                                            le=REPETITION_RANGE[1])
    logit_bias: dict[str, Bias] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    cache_salt: Text | None = Field(default=None, min_length=1, max_length=MAX_SALT_CHARS)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        """400 for a refused field asking for something; the no-op values are dropped."""
        if not isinstance(data, dict):
            return data
        kept = {}
        for name, value in data.items():
            rule = REFUSED.get(name)
            if rule is None or name in cls.model_fields:
                kept[name] = value
            elif not rule[0](value):
                raise APIError(400, f"{name}: {rule[1]}", param=name,
                               code="unsupported_parameter")
        return kept

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or ():
            if not key.isascii() or not key.isdecimal() or len(key) > 12:
                raise ValueError(f"keys must be token ids (non-negative integers), got {key!r}")
        return bias

    def structured(self) -> StructuredSpec | None:
        """The engine's structured output spec; APIError 400 naming the field if invalid."""
        return output_format(self.response_format, self.structured_outputs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def wants_logprobs(self) -> bool:
        return False

    @property
    def top_logprobs_count(self) -> int:
        """Alternatives per generated token to report (0: none)."""
        return 0

    def sampling_params(self, tenant: str | None = None) -> SamplingParams:
        """The engine's parameters (``tenant``: the API key's, for the cache salt); APIError 400
        naming the field if it rejects them."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        structured = self.structured()
        try:
            return SamplingParams(
                max_tokens=self.output_limit, min_tokens=self.min_tokens,
                temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                seed=self.seed, stop=stop, ignore_eos=self.ignore_eos,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty,
                logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
                logprobs=self.wants_logprobs, top_logprobs=self.top_logprobs_count, n=self.n,
                cache_salt=effective_salt(tenant, self.cache_salt), structured=structured)
        except ValueError as exc:
            raise APIError(400, str(exc), param=str(exc).split()[0].split("=")[0],
                           code="invalid_value") from None

    @property
    def output_limit(self) -> int | None:
        """The engine's ``max_tokens``."""
        return self.max_tokens


TokenIds = list[Annotated[int, Field(strict=True, ge=0)]]


class CompletionRequest(_Request):
    """POST /v1/completions: a text, a list of token ids, or a list of either (one choice
    each, in order)."""

    prompt: Text | TokenIds | list[Text] | list[TokenIds] = Field(min_length=1)
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    """N: the chosen tokens' logprobs and each step's N most likely tokens'."""
    echo: StrictBool = False
    """The prompt's text before the completion's (prompt logprobs are not supported)."""

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt):
        if isinstance(prompt, list) and isinstance(prompt[0], (str, list)):
            if len(prompt) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
            if any(len(p) == 0 for p in prompt):
                raise ValueError("every prompt must be non-empty")
        return prompt

    @model_validator(mode="after")
    def _echo_and_choices(self):
        if self.echo and self.logprobs is not None:
            raise APIError(400, "echo: with logprobs it needs the prompt's logprobs, which are "
                           "not supported", param="echo", code="unsupported_parameter")
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise APIError(400, f"n: {len(self.prompts)} prompts x n={self.n} choices exceeds "
                           f"{MAX_CHOICES} choices per request", param="n",
                           code="invalid_value")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per choice."""
        if isinstance(self.prompt, list) and isinstance(self.prompt[0], (str, list)):
            return list(self.prompt)
        return [self.prompt]

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    @property
    def top_logprobs_count(self) -> int:
        return self.logprobs or 0


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions: messages rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, gt=0, le=MAX_TOKENS_LIMIT)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    """With ``logprobs``: each step's most likely tokens and their logprobs."""
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs",
                           code="invalid_value")
        return self

    @cached_property
    def tool_spec(self) -> ToolSpec | None:
        """The request's tools and choice (None: no tools); APIError 400 naming the field."""
        return ToolSpec.build(self.tools, self.tool_choice, self.parallel_tool_calls)

    def structured(self) -> StructuredSpec | None:
        """The output format's grammar, or the one guaranteeing ``tool_choice``'s calls."""
        output = output_format(self.response_format, self.structured_outputs)
        tools = self.tool_spec.structured() if self.tool_spec is not None else None
        if tools is not None and output is not None:
            raise APIError(400, f"tool_choice: {self.tool_spec.choice!r} constrains the output "
                           f"itself; it cannot be combined with response_format or "
                           f"structured_outputs", param="tool_choice", code="invalid_value")
        return tools or output

    @property
    def prompts(self) -> list[list[ChatMessage]]:
        return [self.messages]

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs

    @property
    def top_logprobs_count(self) -> int:
        return self.top_logprobs or 0

    @property
    def output_limit(self) -> int | None:
        """``max_completion_tokens`` where given (OpenAI's newer name), else ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens
