"""Chat messages and tools to prompt token ids, through the tokenizer's chat template.

What the template does with tools is read once from its source (:func:`tool_support`):

- ``native``: it takes ``tools`` and prints ``<tool_call>`` (Qwen2/2.5/3, Hermes-2/3 and other
  Hermes-format templates): messages, tool calls and tool results go to
  ``apply_chat_template(..., tools=...)`` as Hugging Face's tool-use convention has them;
- ``fallback``: it knows nothing of tools (SmolLM2's): the tools are described in the Hermes
  format in the system message (Qwen2.5's wording; the first message becomes or gains one), an
  assistant message's calls are printed after its content as ``<tool_call>`` blocks, and a tool
  result becomes a user turn ``<tool_response>...</tool_response>``, so that any template
  renders the conversation the way Hermes-format models were trained on;
- ``other``: it takes ``tools`` but prints another call format, which this server does not
  parse: a request with tools is a 400 naming ``tools`` rather than calls left unparsed.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from optgptq.serving.openai_tools import CALL_BEGIN, CALL_END
from optgptq.serving.protocol import APIError

ToolSupport = Literal["native", "fallback", "other"]

HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def tool_support(template: str | None) -> ToolSupport:
    """How a chat template's source handles tools."""
    if not template:
        return "fallback"
    import jinja2
    import jinja2.meta

    try:
        names = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return "other"
    if "tools" not in names:
        return "fallback"
    return "native" if CALL_BEGIN in template else "other"


def _call_text(call: dict[str, Any]) -> str:
    function = call["function"]
    body = json.dumps({"name": function["name"], "arguments": function["arguments"]},
                      ensure_ascii=False)
    return f"{CALL_BEGIN}\n{body}\n{CALL_END}"


def fallback_messages(messages: list[dict[str, Any]],
                      tools: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """Messages of role and content only, carrying tools, calls and results as Hermes text."""
    out: list[dict[str, str]] = []
    for m in messages:
        content = m["content"]
        if m.get("tool_calls"):
            content = "\n".join([content] * bool(content) + [_call_text(c)
                                                             for c in m["tool_calls"]])
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n"
                                                   f"</tool_response>"})
        else:
            out.append({"role": m["role"], "content": content})
    if tools:
        described = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False)
                                                         for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


class ChatTemplate:
    """A tokenizer's chat template, with its tool handling found once."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tools = tool_support(getattr(tokenizer, "chat_template", None))

    def check_tools(self) -> None:
        """APIError 400 (``tools``) when the model's template prints calls this server cannot
        parse."""
        if self.tools == "other":
            raise APIError(400, "tools: this model's chat template prints tool calls in a "
                           "format this server does not parse (it parses Hermes <tool_call> "
                           "blocks)", param="tools", code="unsupported_parameter")

    def token_ids(self, messages: list[dict[str, Any]],
                  tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The conversation with the generation prompt, as token ids."""
        if self.tools != "fallback":
            extra = {"tools": tools} if tools else {}
        else:
            messages, extra = fallback_messages(messages, tools), {}
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True, return_dict=True,
                                                  **extra)["input_ids"]
