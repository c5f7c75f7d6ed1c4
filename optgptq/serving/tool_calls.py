"""Tool calls parsed out of generated text: the Hermes format, incrementally.

The format (SmolLM2, Qwen2/2.5/3, Hermes-2/3 and the other templates that print ``<tool_call>``)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call (``"parameters"`` is taken for ``"arguments"``); a block left open when the
output ends is parsed too. A block whose body is not a JSON object naming one of the request's
functions with an object of arguments stays text. The rest of the output is the message's
content, less the blanks around the calls; no content at all is ``None``.

:class:`ToolCallParser` takes the text as it is generated and gives :data:`Event` s: content
as soon as it cannot be the start of a ``<tool_call>`` tag (the longest suffix that can is held
back), each call once its block is closed. The events' concatenation depends only on the whole
text, not on how it was cut into chunks, so a stream's deltas reassemble to the unary response
(which feeds the whole text at once).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from optgptq.serving.openai_tools import CALL_BEGIN, CALL_END


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str
    """The arguments object as compact JSON text (OpenAI's ``function.arguments``)."""
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    def body(self) -> dict:
        """OpenAI's ``tool_calls`` entry of a whole message."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


Event = str | ParsedCall
"""Content text, or one parsed call."""


def parse_call(body: str, names: frozenset[str]) -> ParsedCall | None:
    """The call a block's body holds, or None if it holds none of ``names``."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _held(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolCallParser:
    """One choice's output, fed as it comes (:meth:`feed`, then :meth:`finish`)."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.calls = 0
        self._pending = ""   # text not yet given out
        self._blank = ""     # content blanks held back (dropped before a call and at the end)
        self._in_call = False
        self._after_call = False  # content blanks right after a call are dropped
        self._before_call = ""    # the blanks before an open block (its text if it is no call)

    def feed(self, text: str) -> list[Event]:
        self._pending += text
        return self._drain(final=False)

    def finish(self) -> list[Event]:
        """The events of what was held back once the output has ended."""
        events = self._drain(final=True)
        if self._blank and not self.calls:
            events.append(self._blank)
        self._blank = ""
        return events

    def _drain(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while self._pending:
            if not self._in_call:
                at = self._pending.find(CALL_BEGIN)
                if at < 0:
                    keep = 0 if final else _held(self._pending, CALL_BEGIN)
                    cut = len(self._pending) - keep
                    self._content(self._pending[:cut], events)
                    self._pending = self._pending[cut:]
                    return events
                self._content(self._pending[:at], events)
                self._pending = self._pending[at + len(CALL_BEGIN):]
                self._in_call, self._before_call, self._blank = True, self._blank, ""
                continue
            at = self._pending.find(CALL_END)
            if at < 0 and not final:
                return events
            body = self._pending if at < 0 else self._pending[:at]
            self._pending = "" if at < 0 else self._pending[at + len(CALL_END):]
            self._in_call = False
            call = parse_call(body, self.names)
            if call is None:
                self._blank = self._before_call
                self._content(CALL_BEGIN + body + ("" if at < 0 else CALL_END), events)
            else:
                self.calls += 1
                self._after_call = True
                events.append(call)
        if final and self._in_call:  # "<tool_call>" and nothing after it
            self._in_call, self._blank = False, self._before_call
            self._content(CALL_BEGIN, events)
        return events

    def _content(self, text: str, events: list[Event]) -> None:
        """Content up to its last non-blank character; trailing blanks held back."""
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        text = self._blank + text
        end = len(text.rstrip())
        if end:
            events.append(text[:end])
        self._blank = text[end:]


def whole(text: str, names: frozenset[str]) -> tuple[str | None, list[ParsedCall]]:
    """The content and calls of a whole output."""
    parser = ToolCallParser(names)
    events = parser.feed(text) + parser.finish()
    content = "".join(e for e in events if isinstance(e, str))
    return content or None, [e for e in events if isinstance(e, ParsedCall)]


def finish_reason(engine_reason: str | None, calls: int, named: bool) -> str | None:
    """OpenAI's finish reason: ``tool_calls`` where the output ended (``stop``) with calls,
    except for a named function, where OpenAI says ``stop``."""
    if calls and engine_reason == "stop" and not named:
        return "tool_calls"
    return engine_reason
