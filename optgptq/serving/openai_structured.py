"""Structured output as a request asks for it: OpenAI's ``response_format`` and vLLM's
``structured_outputs``, and the engine's :class:`~optgptq.engine.structured.StructuredSpec`
they come to.

- ``response_format`` (:class:`ResponseFormat`): ``{"type": "text"}`` (nothing to do),
  ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"name", "schema",
  "strict", "description"}}``;
- ``structured_outputs`` (:class:`StructuredOutputs`, vLLM's extra): exactly one of ``json``
  (a schema, as an object or its text), ``regex``, ``choice`` (a list of strings) or
  ``grammar`` (EBNF).

A request gives one of them, not both (:func:`output_format`). A schema, regex or grammar that
does not parse is a 400 naming the field the client sent it in.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from optgptq.engine.structured import StructuredSpec
from optgptq.serving.protocol import APIError, Text


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Text = Field(min_length=1, max_length=64)
    description: Text | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text`` (nothing to do), ``json_object``, ``json_schema``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only there")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` extra: exactly one of its fields."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | Text | None = Field(default=None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = Field(default=None, min_length=1)
    grammar: Text | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [n for n in ("json_", "regex", "choice", "grammar") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice and grammar")
        return self


def output_format(fmt: ResponseFormat | None,
                  ext: StructuredOutputs | None) -> StructuredSpec | None:
    """The engine's spec for a request's ``response_format`` and ``structured_outputs`` (None:
    unconstrained text); APIError 400 naming the field if both are given or the spec is
    invalid."""
    if fmt is not None and fmt.type == "text":
        fmt = None
    if fmt is not None and ext is not None:
        raise APIError(400, "response_format: give it or structured_outputs, not both",
                       param="response_format", code="invalid_value")
    try:
        if fmt is not None and fmt.type == "json_object":
            return StructuredSpec("json_object")
        if fmt is not None:
            return StructuredSpec("json_schema", json.dumps(fmt.json_schema.schema_),
                                  strict=bool(fmt.json_schema.strict))
        if ext is None:
            return None
        field = "structured_outputs"
        if ext.json_ is not None:
            text = ext.json_ if isinstance(ext.json_, str) else json.dumps(ext.json_)
            return StructuredSpec("json_schema", text, field=field)
        if ext.choice is not None:
            return StructuredSpec("choice", json.dumps(ext.choice), field=field)
        kind = "regex" if ext.regex is not None else "grammar"
        return StructuredSpec(kind, getattr(ext, kind), field=field)
    except ValueError as exc:
        name = "response_format" if fmt is not None else "structured_outputs"
        raise APIError(400, str(exc), param=name, code="invalid_value") from None
