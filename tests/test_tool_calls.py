"""Tool calling without Ray: the Hermes parser, the request's tools and choice, the chat template's
rendering (a template that takes tools and SmolLM2's, which does not), and the HTTP API over a
stand-in engine (tests/fake_ingress.py) driven by raw requests and by the official SDK."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from deployments.http_api import build_http_app  # noqa: E402
from fake_ingress import fake_ingress  # noqa: E402
from optgptq.serving.chat_template import ChatTemplate, tool_support  # noqa: E402
from optgptq.serving.tool_calls import ToolCallParser, whole  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}"
    "{% endfor %}\n</tools>\nCall with <tool_call>{\"name\": ..., \"arguments\": ...}"
    "</tool_call><|im_end|>\n{% endif %}"
    "{%- for m in messages %}{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ m.content }}\n</tool_response><|im_end|>\n{%- else %}<|im_start|>{{ m.role }}\n"
    "{{ m.content }}{%- for c in m.tool_calls or [] %}\n<tool_call>\n{\"name\": "
    "\"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}\n"
    "</tool_call>{%- endfor %}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# --- the parser ----------------------------------------------------------------------------------

TEXTS = [
    "Let me look. \n" + CALL + "\n" + CALL.replace("Paris", "Rome") + "\n",
    "no call here, only < and <tool_ca and <tool_callx",
    'x <tool_call>{"name": "unknown", "arguments": {}}</tool_call> y',
    '<tool_call>\n{"name": "get_time", "parameters": {}}',  # left open, "parameters" alias
    "<tool_call>not json</tool_call>",
    CALL + "\n\nDone.\n",
]


@pytest.mark.parametrize("text", TEXTS)
def test_chunked_parse_equals_whole_parse(text):
    names = frozenset({"get_weather", "get_time"})
    content, calls = whole(text, names)
    rng = random.Random(0)
    for _ in range(200):
        parser, events, at = ToolCallParser(names), [], 0
        while at < len(text):
            step = rng.randint(1, 6)
            events += parser.feed(text[at:at + step])
            at += step
        events += parser.finish()
        got = "".join(e for e in events if isinstance(e, str)) or None
        assert got == content
        assert [(e.name, e.arguments) for e in events if not isinstance(e, str)] == [
            (c.name, c.arguments) for c in calls]


def test_what_parses_and_what_stays_text():
    names = frozenset({"get_weather", "get_time"})
    content, calls = whole(TEXTS[0], names)
    assert content == "Let me look."
    assert [json.loads(c.arguments) for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    assert whole(TEXTS[1], names) == (TEXTS[1], [])
    assert whole(TEXTS[2], names) == (TEXTS[2], [])  # a function the request did not offer
    content, calls = whole(TEXTS[3], names)
    assert content is None and [(c.name, c.arguments) for c in calls] == [("get_time", "{}")]
    assert whole(TEXTS[4], names) == (TEXTS[4], [])
    assert whole(TEXTS[5], names)[0] == "Done."


# --- rendering -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from optgptq.models.hub import default_tokenizer_path

    return AutoTokenizer.from_pretrained(str(default_tokenizer_path()))


CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1"}]


def test_template_support_is_read_from_the_template(tokenizer):
    assert tool_support(tokenizer.chat_template) == "fallback"  # SmolLM2's knows no tools
    assert tool_support(HERMES_TEMPLATE) == "native"
    assert tool_support("{% for t in tools %}{{ t }}{% endfor %}[TOOL_CALLS]") == "other"


@pytest.mark.parametrize("template", [None, HERMES_TEMPLATE], ids=["fallback", "native"])
def test_tools_calls_and_results_are_rendered(tokenizer, template):
    if template is not None:
        tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
        tokenizer.chat_template = template
    chat = ChatTemplate(tokenizer)
    text = tokenizer.decode(chat.token_ids(CONVERSATION, [WEATHER]))
    assert '"name": "get_weather"' in text and "The weather in a city" in text  # the tool
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    plain = tokenizer.decode(chat.token_ids(CONVERSATION[:1]))
    assert "<tools>" not in plain and "get_weather" not in plain


# --- the HTTP API --------------------------------------------------------------------------------

@pytest.fixture
def api():
    ingress = fake_ingress({})
    return ingress, TestClient(build_http_app(ingress), raise_server_exceptions=False)


def _chat(client, **fields):
    return client.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def _events(response) -> list[dict]:
    lines = [ln[6:] for ln in response.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_auto_parses_calls_unary_and_streamed(api):
    ingress, client = api
    ingress.client.text, ingress.client.finish_reason = ["Sure. <tool_", CALL[6:]], "stop"
    r = _chat(client, tools=[WEATHER, TIME])
    assert r.status_code == 200, r.text
    assert ingress.client.tools[-1] == [WEATHER, {"type": "function",
                                                   "function": {"name": "get_time"}}]
    assert ingress.client.opened[-1][1].structured is None  # auto: nothing constrains it
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Sure."
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}

    events = _events(_chat(client, tools=[WEATHER], stream=True))
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content") or "" for d in deltas) == "Sure."
    pieces = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert pieces[0]["index"] == 0 and pieces[0]["id"].startswith("call_")
    assert pieces[0]["type"] == "function" and pieces[0]["function"]["name"] == "get_weather"
    assert "".join(p["function"]["arguments"] for p in pieces) == '{"city": "Paris"}'
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_none_does_not_parse_and_named_finishes_with_stop(api):
    ingress, client = api
    ingress.client.text, ingress.client.finish_reason = [CALL[:5], CALL[5:]], "stop"
    message = _chat(client, tools=[WEATHER], tool_choice="none").json()["choices"][0]
    assert message["message"] == {"role": "assistant", "content": CALL}
    assert ingress.client.tools[-1] == [WEATHER]  # rendered all the same
    named = {"type": "function", "function": {"name": "get_weather"}}
    choice = _chat(client, tools=[WEATHER, TIME], tool_choice=named).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    spec = ingress.client.opened[-1][1].structured
    assert spec.kind == "structural_tag" and "get_time" not in spec.spec


def test_required_sends_a_grammar_of_every_tool(api):
    ingress, client = api
    assert _chat(client, tools=[WEATHER, TIME], tool_choice="required",
                 parallel_tool_calls=False).status_code == 200
    spec = json.loads(ingress.client.opened[-1][1].structured.spec)["format"]
    assert spec["type"] == "tags_with_separator" and spec["stop_after_first"] is True
    assert [t["begin"] for t in spec["tags"]] == [
        '<tool_call>\n{"name": "get_weather", "arguments": ',
        '<tool_call>\n{"name": "get_time", "arguments": ']


@pytest.mark.parametrize("fields,param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "no-such-type"}}}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "array"}}}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"messages": [{"role": "tool", "content": "21 C"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
        "function": {"name": "f", "arguments": "[1]"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "tool_calls": []}]}, "messages"),
])
def test_bad_tool_input_is_400_naming_the_field(api, fields, param):
    ingress, client = api
    r = _chat(client, **fields)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert ingress.client.opened == []


def test_a_conversation_with_calls_and_results_reaches_the_template(api):
    ingress, client = api
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {
                        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": [
                    {"type": "text", "text": "sunny"}]}]
    assert _chat(client, messages=messages, tools=[WEATHER]).status_code == 200
    assert ingress.client.prompts[-1][1:] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]


def test_the_official_sdk_reads_calls_and_their_deltas(api):
    openai = pytest.importorskip("openai")
    ingress, client = api
    ingress.client.text, ingress.client.finish_reason = [CALL[:9], CALL[9:]], "stop"
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)
    out = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                      tools=[WEATHER], tool_choice="required")
    call = out.choices[0].message.tool_calls[0]
    assert out.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(sdk.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER], stream=True))
    pieces = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].function.name == "get_weather"
    assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments
