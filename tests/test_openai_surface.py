"""The OpenAI request and response surface over a stand-in ingress (tests/fake_ingress.py): every
field implemented or refused by name, multi-prompt choices, echo, logprobs, stream chunks."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from deployments.http_api import build_http_app  # noqa: E402
from fake_ingress import fake_ingress  # noqa: E402
from optgptq.serving.openai_requests import REFUSED  # noqa: E402

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
PROMPT = {"model": "m", "prompt": "hi"}


@pytest.fixture
def api():
    ingress = fake_ingress({})
    return ingress, TestClient(build_http_app(ingress), raise_server_exceptions=False)


def _post(client, path, body):
    return client.post(path, json=body)


def _events(response) -> list[dict]:
    lines = [ln[len("data: "):] for ln in response.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


@pytest.mark.parametrize("field,value", [
    ("best_of", 3), ("prediction", {"type": "content", "content": "x"}),
    ("suffix", "end"), ("user", "u-1"), ("store", True), ("metadata", {"a": "b"}),
    ("stream_options", {"include_usage": True, "continuous_usage_stats": True}),
    ("modalities", ["text", "audio"]), ("reasoning_effort", "low"),
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
])
def test_unimplemented_fields_are_refused_by_name(api, field, value):
    ingress, client = api
    chat = [("/v1/chat/completions", CHAT)] if not field.startswith("tool") else []
    for path, body in chat + [("/v1/completions", PROMPT)]:  # tools: chat only
        r = _post(client, path, {**body, field: value})
        assert r.status_code == 400, (path, field, r.text)
        error = r.json()["error"]
        assert error["param"] == field and field in error["message"]
    assert ingress.client.opened == []


@pytest.mark.parametrize("field,value", [
    ("n", 1), ("presence_penalty", 0), ("frequency_penalty", 0.0), ("logit_bias", {}),
    ("response_format", {"type": "text"}), ("tools", []), ("tool_choice", "none"),
    ("store", False), ("service_tier", "auto"), ("modalities", ["text"]), ("top_logprobs", 0),
])
def test_values_that_ask_for_nothing_are_accepted(api, field, value):
    _, client = api
    assert _post(client, "/v1/chat/completions", {**CHAT, field: value}).status_code == 200


def test_unknown_fields_and_wrong_types_are_400(api):
    _, client = api
    r = _post(client, "/v1/completions", {**PROMPT, "temprature": 0.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temprature"
    assert "unknown parameter" in r.json()["error"]["message"]
    r = _post(client, "/v1/completions", {**PROMPT, "max_tokens": "ten"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert set(REFUSED) >= {"best_of", "tools"}
    assert not set(REFUSED) & {"n", "presence_penalty", "frequency_penalty", "logit_bias",
                               "top_logprobs"}


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("field,value,kind", [
    ("response_format", {"type": "json_object"}, "json_object"),
    ("response_format", {"type": "json_schema", "json_schema": {
        "name": "x", "schema": SCHEMA, "strict": True}}, "json_schema"),
    ("structured_outputs", {"json": SCHEMA}, "json_schema"),
    ("structured_outputs", {"regex": "[a-z]+"}, "regex"),
    ("structured_outputs", {"choice": ["yes", "no"]}, "choice"),
    ("structured_outputs", {"grammar": 'root ::= "a" | "b"'}, "grammar"),
])
def test_structured_output_reaches_the_engine(api, field, value, kind):
    ingress, client = api
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", PROMPT)):
        assert _post(client, path, {**body, field: value}).status_code == 200
        spec = ingress.client.opened[-1][1].structured
        assert spec.kind == kind and spec.field == field
    if kind == "json_schema":
        assert json.loads(spec.spec) == SCHEMA


@pytest.mark.parametrize("field,value", [
    ("response_format", {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}),
    ("response_format", {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer", "minimum": "zero"}}}),
    ("response_format", {"type": "json_schema"}),
    ("response_format", {"type": "xml"}),
    ("structured_outputs", {"regex": "(("}),
    ("structured_outputs", {"grammar": "root ::= missing"}),
    ("structured_outputs", {"regex": "a", "choice": ["b"]}),
    ("structured_outputs", {"whitespace_pattern": " "}),
])
def test_invalid_structured_output_is_400_naming_the_field(api, field, value):
    ingress, client = api
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", PROMPT)):
        r = _post(client, path, {**body, field: value})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"].startswith(field), r.json()
        assert field in r.json()["error"]["message"] or r.json()["error"]["param"] != field
    r = _post(client, "/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"},
                                              "structured_outputs": {"regex": "a"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    assert ingress.client.opened == []


def test_content_parts_and_developer_role(api):
    ingress, client = api
    body = {"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert _post(client, "/v1/chat/completions", body).status_code == 200
    assert ingress.client.prompts[-1] == [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "a\nb"}]
    body["messages"][1]["content"].append({"type": "image_url", "image_url": {"url": "x"}})
    r = _post(client, "/v1/chat/completions", body)
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]


def test_list_prompts_give_one_choice_each(api):
    ingress, client = api
    body = _post(client, "/v1/completions", {"model": "m", "prompt": ["ab", "cde"]}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["text"] == "hello" for c in body["choices"])
    assert body["usage"]["prompt_tokens"] == 2 + 3 and body["usage"]["completion_tokens"] == 4
    body = _post(client, "/v1/completions", {"model": "m", "prompt": [[5, 6], [7]]}).json()
    assert len(body["choices"]) == 2 and ingress.client.opened[-1][0] == [7]
    for mixed in (["ab", [5]], [[]], ["x"] * 65):
        r = _post(client, "/v1/completions", {"model": "m", "prompt": mixed})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_echo_and_completion_logprobs(api):
    _, client = api
    r = _post(client, "/v1/completions", {**PROMPT, "echo": True}).json()
    assert r["choices"][0]["text"] == "hihello" and r["choices"][0]["logprobs"] is None
    r = _post(client, "/v1/completions", {**PROMPT, "logprobs": 0}).json()
    lp = r["choices"][0]["logprobs"]
    assert lp == {"tokens": ["h", "l"], "token_logprobs": [-0.5, -1.5], "top_logprobs": None,
                  "text_offset": [0, 1]}
    r = _post(client, "/v1/completions", {**PROMPT, "echo": True, "logprobs": 0})
    assert r.status_code == 400  # would need the prompt's logprobs


def test_chat_logprobs(api):
    ingress, client = api
    r = _post(client, "/v1/chat/completions", {**CHAT, "logprobs": True}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert [(c["token"], c["logprob"], c["bytes"]) for c in content] == [
        ("h", -0.5, [104]), ("l", -1.5, [108])]
    assert ingress.client.opened[-1][1].logprobs is True
    r = _post(client, "/v1/chat/completions", CHAT).json()
    assert r["choices"][0]["logprobs"] is None and ingress.client.opened[-1][1].logprobs is False


def test_stream_role_first_and_usage_last(api):
    _, client = api
    events = _events(_post(client, "/v1/chat/completions",
                           {**CHAT, "stream": True, "stream_options": {"include_usage": True}}))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "hello"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2
    plain = _events(_post(client, "/v1/chat/completions", {**CHAT, "stream": True}))
    assert all("usage" not in e for e in plain)


def test_stream_role_goes_out_with_the_first_token(api):
    """A chat choice's role chunk waits for its first token (clients such as ``vllm bench
    serve`` time the first token by the first chunk): the first write carries both."""
    _, client = api
    body = json.dumps({**CHAT, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
             "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if incoming:
            return incoming.pop()
        await asyncio.Event().wait()  # the client stays connected

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(client.app(scope, receive, send))
    writes = [m["body"].decode() for m in sent if m["type"] == "http.response.body" and m["body"]]
    first = [json.loads(e[len("data: "):]) for e in writes[0].split("\n\n") if e]
    assert [c["choices"][0]["delta"] for c in first] == [{"role": "assistant", "content": ""},
                                                         {"content": "he"}]


def test_stream_of_several_prompts_with_logprobs(api):
    _, client = api
    events = _events(_post(client, "/v1/completions", {"model": "m", "prompt": ["a", "b"],
                                                       "stream": True, "logprobs": 0,
                                                       "echo": False}))
    for index in (0, 1):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == "hello"
        assert [t for c in mine if c["logprobs"] for t in c["logprobs"]["tokens"]] == ["h", "l"]
        assert mine[-1]["finish_reason"] == "length"


def test_model_by_id(api):
    _, client = api
    assert client.get("/v1/models/m").json()["id"] == "m"
    r = client.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("path,field,value", [
    ("/v1/chat/completions", "presence_penalty", 2.5), ("/v1/completions", "frequency_penalty", -3),
    ("/v1/completions", "presence_penalty", True), ("/v1/completions", "frequency_penalty", "1"),
    ("/v1/completions", "repetition_penalty", 0),
    ("/v1/chat/completions", "repetition_penalty", -1),
    ("/v1/completions", "logit_bias", {"abc": 1}), ("/v1/completions", "logit_bias", {"-5": 1}),
    ("/v1/chat/completions", "logit_bias", {"5": 101}),
    ("/v1/completions", "logit_bias", {str(i): 1 for i in range(301)}),
    ("/v1/completions", "min_tokens", -1), ("/v1/completions", "min_tokens", 17),
    ("/v1/chat/completions", "n", 0), ("/v1/completions", "n", 129),
    ("/v1/completions", "n", 1.5), ("/v1/chat/completions", "top_logprobs", 21),
    ("/v1/chat/completions", "top_logprobs", 2), ("/v1/completions", "logprobs", 6),
    ("/v1/completions", "top_logprobs", 2),
])
def test_bad_values_of_the_engine_fields_are_400_naming_them(api, path, field, value):
    """(min_tokens 17 exceeds max_tokens 16; top_logprobs without logprobs: true; completions
    have no top_logprobs field.)"""
    ingress, client = api
    body = CHAT if "chat" in path else PROMPT
    r = _post(client, path, {**body, field: value})
    assert r.status_code == 400, (field, value, r.text)
    assert r.json()["error"]["param"] == field, r.json()
    assert ingress.client.opened == []


def test_engine_fields_reach_the_engine(api):
    ingress, client = api
    r = _post(client, "/v1/chat/completions", {
        **CHAT, "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2,
        "logit_bias": {"50": 10, "7": -100}, "min_tokens": 3, "max_completion_tokens": 9,
        "logprobs": True, "top_logprobs": 4, "n": 2, "seed": 5})
    assert r.status_code == 200, r.text
    params = ingress.client.opened[-1][1]
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty,
            params.logit_bias, params.min_tokens, params.max_tokens, params.logprobs,
            params.top_logprobs, params.n) == (0.5, -1, 1.2, {50: 10, 7: -100}, 3, 9, True, 4, 2)
    r = _post(client, "/v1/completions", {**PROMPT, "logprobs": 3, "min_tokens": 16})
    params = ingress.client.opened[-1][1]
    assert r.status_code == 200 and (params.logprobs, params.top_logprobs) == (True, 3)


def test_n_choices_per_prompt_are_numbered_and_counted_once(api):
    ingress, client = api
    body = _post(client, "/v1/completions", {"model": "m", "prompt": ["ab", "cde"], "n": 3,
                                             "echo": True}).json()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert [c["text"] for c in body["choices"]] == ["abhello"] * 3 + ["cdehello"] * 3
    assert len(ingress.client.opened) == 2  # one engine request per prompt, n choices each
    assert body["usage"]["prompt_tokens"] == 2 + 3 and body["usage"]["completion_tokens"] == 12
    r = _post(client, "/v1/completions", {"model": "m", "prompt": ["a"] * 64, "n": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    events = _events(_post(client, "/v1/chat/completions", {**CHAT, "n": 2, "stream": True}))
    for index in (0, 1):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant" and mine[-1]["finish_reason"] == "length"
        assert "".join(c["delta"].get("content", "") for c in mine) == "hello"


def test_top_logprobs_shapes(api):
    _, client = api
    r = _post(client, "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 2})
    first = r.json()["choices"][0]["logprobs"]["content"][0]
    assert (first["token"], first["logprob"]) == ("h", -0.5)
    assert first["top_logprobs"] == [{"token": "h", "logprob": -0.5, "bytes": [104]},
                                     {"token": "i", "logprob": -1.5, "bytes": [105]}]
    lp = _post(client, "/v1/completions", {**PROMPT, "logprobs": 2}).json()["choices"][0]
    assert lp["logprobs"]["top_logprobs"] == [{"h": -0.5, "i": -1.5}, {"l": -1.5, "m": -2.5}]
    events = _events(_post(client, "/v1/completions", {**PROMPT, "logprobs": 1, "stream": True}))
    tops = [t for e in events if e["choices"][0]["logprobs"]
            for t in e["choices"][0]["logprobs"]["top_logprobs"]]
    assert tops == [{"h": -0.5}, {"l": -1.5}]
