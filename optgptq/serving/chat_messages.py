"""Chat messages as requests carry them, and as chat templates take them.

Roles: ``system``, ``developer`` (rendered as system, as OpenAI treats it for models without a
developer role), ``user``, ``assistant`` and ``tool``. Content is a string or a list of ``{"type":
"text", "text": ...}`` parts, joined by newlines (other part types are refused). An assistant
message may carry ``tool_calls`` (OpenAI's ``[{"id", "type": "function", "function": {"name",
"arguments"}}]``, ``arguments`` a JSON object's text) and then may have no content; a ``tool``
message answers one of them and must name it (``tool_call_id``). Errors are APIError 400
naming ``messages``.

:meth:`ChatMessage.rendered` gives the dict a chat template takes: the role, the text content,
and where present ``tool_calls`` (their ``arguments`` parsed into objects, as Hugging Face's tool
templates expect) or ``tool_call_id``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from optgptq.serving.protocol import APIError, Text

MAX_TOOL_CALLS = 128
"""Tool calls one assistant message may carry."""


def _bad(message: str) -> APIError:
    return APIError(400, f"messages: {message}", param="messages", code="invalid_value")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text = Field(min_length=1, max_length=64)
    arguments: Text
    """A JSON object's text, as the server returned it."""


class ToolCall(BaseModel):
    """A tool call an earlier assistant message made."""

    model_config = ConfigDict(extra="forbid")
    id: Text = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall

    def rendered(self) -> dict[str, Any]:
        try:
            arguments = json.loads(self.function.arguments)
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise _bad(f"tool call {self.id!r}: function.arguments must be a JSON object's text")
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": arguments}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOL_CALLS)
    tool_call_id: Text | None = Field(default=None, min_length=1, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _parts(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("content"), list):
            for part in data["content"]:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise APIError(400, f"messages: content parts of type {kind!r} are not "
                                   f"supported (text only)", param="messages",
                                   code="unsupported_parameter")
        return data

    @model_validator(mode="after")
    def _role_fields(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise _bad(f"tool_calls belong to assistant messages, not {self.role!r} ones")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise _bad("a tool message needs tool_call_id (the call it answers)"
                       if self.role == "tool" else
                       f"tool_call_id belongs to tool messages, not {self.role!r} ones")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise _bad(f"a {self.role} message needs content")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return (self.content if isinstance(self.content, str)
                else "\n".join(p.text for p in self.content))

    def rendered(self) -> dict[str, Any]:
        """The message as the chat template takes it."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = [c.rendered() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message
