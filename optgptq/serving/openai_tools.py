"""Tool calling's request side: ``tools``, ``tool_choice``, ``parallel_tool_calls``.

``tools`` are OpenAI's ``[{"type": "function", "function": {"name", "description", "parameters",
"strict"}}]``: names of 1-64 letters, digits, ``_`` and ``-``, unique; ``parameters`` a JSON
Schema of an object (absent: no arguments). Every schema is parsed once here (xgrammar), so a
bad one is a 400 naming ``tools`` before anything is queued. ``tool_choice``:

- ``auto`` (the default with tools): the tools are rendered into the prompt and the output is
  parsed for calls (:mod:`optgptq.serving.tool_calls`); nothing constrains it;
- ``none``: the tools are still rendered (OpenAI's model sees them too: earlier calls in the
  conversation stay meaningful) but the output is not parsed;
- ``required``: at least one call (several unless ``parallel_tool_calls`` is false);
- ``{"type": "function", "function": {"name": ...}}``: exactly one call of that function.

The last two are guaranteed by the grammar (:meth:`ToolSpec.structured`): an xgrammar structural
tag of the Hermes format this server parses, ``<tool_call>\\n{"name": NAME, "arguments": ARGS}
\\n</tool_call>``, with ``NAME`` fixed per tag and ``ARGS`` following the function's schema; it
goes through the engine's structured-output path (:mod:`optgptq.engine.structured`), so it cannot
be combined with ``response_format`` / ``structured_outputs`` (400). ``required`` or a named
function without tools, or a name not among them, is a 400 naming ``tool_choice``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from optgptq.engine.structured import StructuredSpec
from optgptq.serving.protocol import APIError, Text

MAX_TOOLS = 128
CALL_BEGIN, CALL_END = "<tool_call>", "</tool_call>"
"""The Hermes tool-call tags (SmolLM2-, Qwen- and Hermes-family templates)."""
NO_ARGUMENTS = {"type": "object", "properties": {}}


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None

    @property
    def schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else NO_ARGUMENTS


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef

    def rendered(self) -> dict[str, Any]:
        """The tool as chat templates take it (OpenAI's shape, unset fields left out)."""
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text = Field(min_length=1, max_length=64)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


@dataclass(frozen=True)
class ToolSpec:
    """A request's validated tools and choice: what to render, whether to parse, what grammar."""

    tools: list[Tool]
    choice: str
    """``none``, ``auto``, ``required`` or ``function`` (then :attr:`name`)."""
    name: str | None = None
    parallel: bool = True

    @classmethod
    def build(cls, tools: list[Tool] | None, choice: ToolChoice | None,
              parallel: bool | None) -> ToolSpec | None:
        """The spec of a request's fields (None: no tools, nothing to do); APIError 400 naming
        the field that is wrong."""
        tools = tools or []
        kind = choice.type if isinstance(choice, NamedToolChoice) else choice
        if not tools:
            if kind in ("required", "function"):
                raise _bad("tool_choice", f"{kind!r} needs tools")
            if parallel is not None:
                raise _bad("parallel_tool_calls", "only meaningful with tools")
            return None
        if len(tools) > MAX_TOOLS:
            raise _bad("tools", f"at most {MAX_TOOLS} tools")
        names = [t.function.name for t in tools]
        if len(set(names)) != len(names):
            raise _bad("tools", "function names must be unique")
        for tool in tools:
            schema = tool.function.schema
            if schema.get("type", "object") != "object":
                raise _bad("tools", f"{tool.function.name}: parameters must be an object's schema")
            try:
                StructuredSpec("json_schema", json.dumps(schema), field="tools",
                               strict=bool(tool.function.strict))
            except ValueError as exc:
                raise _bad("tools", f"{tool.function.name}: {exc}".replace("tools: ", "")) from None
        name = None
        if isinstance(choice, NamedToolChoice):
            name = choice.function.name
            if name not in names:
                raise _bad("tool_choice", f"function {name!r} is not among the tools "
                           f"({', '.join(names)})")
        return cls(tools, kind or "auto", name, True if parallel is None else parallel)

    @property
    def parses(self) -> bool:
        """Whether the output is parsed for tool calls."""
        return self.choice != "none"

    @property
    def names(self) -> frozenset[str]:
        """The functions a parsed call may name."""
        if self.name is not None:
            return frozenset((self.name,))
        return frozenset(t.function.name for t in self.tools)

    def rendered(self) -> list[dict[str, Any]]:
        return [t.rendered() for t in self.tools]

    def structured(self) -> StructuredSpec | None:
        """The grammar guaranteeing the calls (``required``, named), else None."""
        if self.choice not in ("required", "function"):
            return None
        tags = [_tag(t.function) for t in self.tools if t.function.name in self.names]
        if self.choice == "function":
            fmt: dict[str, Any] = tags[0]
        else:
            fmt = {"type": "tags_with_separator", "tags": tags, "separator": "\n",
                   "at_least_one": True, "stop_after_first": not self.parallel}
        return StructuredSpec("structural_tag", json.dumps({"type": "structural_tag",
                                                           "format": fmt}), field="tool_choice")


def _tag(function: FunctionDef) -> dict[str, Any]:
    """One function's call in the Hermes format; one blank at most between JSON tokens."""
    return {"type": "tag", "end": "}\n" + CALL_END,
            "begin": f'{CALL_BEGIN}\n{{"name": {json.dumps(function.name)}, "arguments": ',
            "content": {"type": "json_schema", "json_schema": function.schema,
                        "max_whitespace_cnt": 1}}
