"""The OpenAI response bodies: whole responses, streamed chunks, logprobs and usage.

Unary responses are ``chat.completion`` / ``text_completion`` objects with one choice per prompt
(``index`` in prompt order) and the usage of all of them. A stream is server-sent events of
``chat.completion.chunk`` / ``text_completion`` objects: for chat, each choice's first chunk
carries ``delta.role``; a choice's last chunk its ``finish_reason``; with
``stream_options.include_usage`` every chunk has ``"usage": null`` and one more chunk, with no
choices, the usage of the whole request. Logprobs, where asked, take OpenAI's two shapes: chat
``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}``
(``top_logprobs`` empty unless asked for), completions ``{"tokens", "token_logprobs",
"top_logprobs", "text_offset"}`` (``top_logprobs``: per token a ``{text: logprob}`` of the N
most likely tokens and the chosen one, OpenAI's "up to logprobs + 1"; None for ``logprobs: 0``).
A response of ``n`` choices per prompt numbers them ``prompt_index * n + j``.

With tools (:class:`~optgptq.serving.openai_tools.ToolSpec`, ``tool_choice`` other than
``none``) a chat choice's text is parsed for calls (:mod:`optgptq.serving.tool_calls`): the
message gets ``tool_calls`` and the content around them (``None`` if there is none), and the
finish reason ``tool_calls``; streamed, each call is two chunks once its block is complete, OpenAI's
delta format: ``{"tool_calls": [{"index", "id", "type": "function", "function": {"name",
"arguments": ""}}]}`` then ``{"tool_calls": [{"index", "function": {"arguments"}}]}``.

A text-only chunk, the common case, is rendered from a template made once per stream: only the
text is encoded per event (a JSON dump per token was the ingress's largest cost).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

from optgptq.serving.openai_tools import ToolSpec
from optgptq.serving.tool_calls import ParsedCall, ToolCallParser, finish_reason as tool_finish
from optgptq.serving.tool_calls import whole

TokenText = Callable[[int], str]
"""A token id's text (the tokenizer's decoding of it alone)."""
TopLogprobs = Sequence[tuple[int, float]]
"""A step's most likely ``(token id, logprob)``, most likely first."""


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def add_usage(a: dict, b: dict) -> dict:
    """The usage of two choices together."""
    return usage(a["prompt_tokens"] + b["prompt_tokens"],
                 a["completion_tokens"] + b["completion_tokens"],
                 a["prompt_tokens_details"]["cached_tokens"]
                 + b["prompt_tokens_details"]["cached_tokens"])


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def logprobs_body(chat: bool, tokens: Sequence[tuple[int, float, TopLogprobs | None]],
                  token_text: TokenText, offset: int = 0) -> dict:
    """Logprobs of the chosen ``(token id, logprob, top alternatives or None)`` s; ``offset``:
    where the first token's text starts in the choice's text (completions' ``text_offset``)."""
    texts = [token_text(t) for t, _, _ in tokens]
    if chat:
        return {"content": [{**_entry(s, lp), "top_logprobs": [
            _entry(token_text(i), v) for i, v in top or ()]}
            for s, (_, lp, top) in zip(texts, tokens)]}
    offsets = []
    for s in texts:
        offsets.append(offset)
        offset += len(s)
    top_logprobs = None
    if any(top for _, _, top in tokens):
        top_logprobs = [{**{token_text(i): v for i, v in top or ()}, s: lp}
                        for s, (_, lp, top) in zip(texts, tokens)]
    return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in tokens],
            "top_logprobs": top_logprobs, "text_offset": offsets}


def choice(chat: bool, index: int, text: str, finish_reason: str | None,
           logprobs: dict | None, tools: ToolSpec | None = None) -> dict:
    """One choice of a whole response (``tools``: parse the text for calls)."""
    if chat and tools is not None and tools.parses:
        content, calls = whole(text, tools.names)
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [c.body() for c in calls]
        return {"index": index, "message": message, "logprobs": logprobs,
                "finish_reason": tool_finish(finish_reason, len(calls), tools.name is not None)}
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def response_body(rid: str, model: str, chat: bool, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices, "usage": use}


class ChunkEncoder:
    """The server-sent events of one streamed response (all its choices)."""

    _MARK = "\u0001optgptq\u0001"

    def __init__(self, rid: str, model: str, chat: bool, include_usage: bool,
                 tools: ToolSpec | None = None) -> None:
        self.rid, self.model, self.chat, self.include_usage = rid, model, chat, include_usage
        self._templates: dict[int, tuple[str, str]] = {}
        self._tools = tools if chat and tools is not None and tools.parses else None
        self._parsers: dict[int, ToolCallParser] = {}

    def _body(self, choices: list[dict], use: dict | None = None) -> dict:
        body = {"id": self.rid, "object": "chat.completion.chunk" if self.chat
                else "text_completion", "created": int(time.time()), "model": self.model,
                "choices": choices}
        if self.include_usage:
            body["usage"] = use
        return body

    def _choice(self, index: int, delta: dict | str, finish_reason: str | None,
                logprobs: dict | None) -> dict:
        if self.chat:
            return {"index": index, "delta": delta, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        return {"index": index, "text": delta, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def _event(self, body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    def start(self, index: int) -> str:
        """A chat choice's first chunk: the role."""
        return self._event(self._body([self._choice(index, {"role": "assistant", "content": ""},
                                                    None, None)]))

    def text(self, index: int, text: str) -> str:
        template = self._templates.get(index)
        if template is None:
            delta = {"content": self._MARK} if self.chat else self._MARK
            body = json.dumps(self._body([self._choice(index, delta, None, None)]))
            head, _, tail = body.partition(json.dumps(self._MARK))
            template = self._templates[index] = (head, tail)
        return f"data: {template[0]}{json.dumps(text)}{template[1]}\n\n"

    def step(self, index: int, text: str, finished: bool, finish_reason: str | None,
             logprobs: dict | None) -> str:
        """The events of one chunk of a choice's output (``finished``: its last)."""
        if self._tools is None:
            if finished or logprobs is not None:
                return self.delta(index, text, finish_reason if finished else None, logprobs)
            return self.text(index, text) if text else ""
        parser = self._parsers.setdefault(index, ToolCallParser(self._tools.names))
        calls = parser.calls
        events = parser.feed(text) + (parser.finish() if finished else [])
        out = []
        for event in events:
            if isinstance(event, ParsedCall):
                out.append(self.tool_call(index, calls, event))
                calls += 1
            else:
                out.append(self.text(index, event))
        if finished or logprobs is not None:
            reason = (tool_finish(finish_reason, parser.calls, self._tools.name is not None)
                      if finished else None)
            out.append(self.delta(index, "", reason, logprobs))
        return "".join(out)

    def tool_call(self, index: int, number: int, call: ParsedCall) -> str:
        """A call's two chunks: its id, type and name, then its arguments."""
        head = {"index": number, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": ""}}
        tail = {"index": number, "function": {"arguments": call.arguments}}
        return "".join(self._event(self._body([self._choice(index, {"tool_calls": [c]}, None,
                                                            None)])) for c in (head, tail))

    def delta(self, index: int, text: str, finish_reason: str | None,
              logprobs: dict | None) -> str:
        """A chunk with whatever a text-only one cannot carry (the end, logprobs)."""
        delta = ({"content": text} if text or finish_reason is None else {}) if self.chat else text
        return self._event(self._body([self._choice(index, delta, finish_reason, logprobs)]))

    def usage(self, use: dict) -> str:
        return self._event(self._body([], use))
