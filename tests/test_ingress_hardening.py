"""The ingress's HTTP and gRPC APIs against hostile input and without keys, no Ray cluster: the
apps are served over an engine client stand-in that records what reaches it."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from deployments.app import IngressConfig  # noqa: E402
from deployments.auth import collect_keys, digest, parse_keys_file  # noqa: E402
from deployments.grpc_api import GRPCService, grpc_handlers  # noqa: E402
from deployments.http_api import MAX_DEPTH, build_http_app  # noqa: E402
from fake_ingress import KEY, OTHER, fake_ingress as _ingress  # noqa: E402
from optgptq.serving import optgptq_pb2 as pb  # noqa: E402

@pytest.fixture
def open_api():
    ingress = _ingress({})
    return ingress, TestClient(build_http_app(ingress), raise_server_exceptions=False)


@pytest.fixture
def keyed_api():
    ingress = _ingress({digest(KEY): "tenant-a", digest(OTHER): "tenant-b"})
    return ingress, TestClient(build_http_app(ingress), raise_server_exceptions=False)


def _post(client, body, path="/v1/completions", headers=None, raw: bytes | None = None):
    headers = {"content-type": "application/json", **(headers or {})}
    return client.post(path, content=raw if raw is not None else json.dumps(body),
                       headers=headers)


def _nested(depth: int) -> dict:
    """A completions body nested ``depth`` levels deep (the body itself is level 1)."""
    value: object = 0
    for _ in range(depth - 1):
        value = [value]
    return {"model": "m", "prompt": "x", "extra": value}


HOSTILE = [  # (raw body, status): never a 500, never a crash
    (b"[" * 5000 + b"]" * 5000, 400),                        # deep nesting (RecursionError)
    (json.dumps(_nested(MAX_DEPTH + 1)).encode(), 400),         # deeper than MAX_DEPTH
    (b'{"model": "m", "prompt": "a\\ud800b"}', 400),         # lone surrogate
    (b'{"model": "m", "messages": [{"role": "user", "content": "\\udfff"}]}', 400),
    (b'{"model": "m", "prompt": [false]}', 400),             # a boolean is no token id
    (b'{"model": "m", "prompt": [1.5]}', 400),
    (b'{"model": "m", "prompt": [-1]}', 400),
    (b'{"model": "m", "prompt": "x", "temperature": NaN}', 400),
    (b'{"model": "m", "prompt": "x", "temperature": 1e400}', 400),
    (b'{"model": "m", "prompt": "x", "seed": 1' + b"0" * 40 + b"}", 400),
    (b'{"model": "m", "prompt": "x", "max_tokens": true}', 400),
    (b'{"model": "m", "prompt": "x", "top_k": 99999999999999999999}', 400),
    (b'{"model": "m", "prompt": "x", "cache_salt": ""}', 400),
    (b'{"model": "m", "prompt": "x", "repetition_penalty": 5e-324}', 400),  # logits to inf
    (b"\xff\xfe not json", 400),
    (b"", 400),
]


@pytest.mark.parametrize("raw,status", HOSTILE)
def test_hostile_bodies_get_openai_errors(open_api, raw, status):
    ingress, client = open_api
    r = _post(client, None, raw=raw)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert ingress.client.opened == []


def test_depth_limit_is_exact(open_api):
    _, client = open_api
    within = _post(client, _nested(MAX_DEPTH)).json()["error"]  # parsed, then refused
    assert within["param"] == "extra" and "unknown parameter" in within["message"]
    beyond = _post(client, _nested(MAX_DEPTH + 1)).json()["error"]
    assert beyond["code"] == "invalid_json" and "nested deeper" in beyond["message"]


def test_content_type_is_enforced(open_api):
    _, client = open_api
    body = json.dumps({"model": "m", "prompt": "hi"})
    for kind in ("text/plain", "application/x-www-form-urlencoded", ""):
        r = client.post("/v1/completions", content=body, headers={"content-type": kind})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = client.post("/v1/completions", content=body,
                    headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_no_replica_header_unless_asked(open_api):
    ingress, client = open_api
    r = _post(client, {"model": "m", "prompt": "hi"})
    assert r.status_code == 200 and "x-optgptq-replica" not in r.headers
    debug = _ingress({}, replica_header=True)
    r = _post(TestClient(build_http_app(debug)), {"model": "m", "prompt": "hi"})
    assert r.headers["x-optgptq-replica"] == "replica-1"


def test_internal_errors_carry_no_detail(open_api):
    ingress, client = open_api
    ingress.client.fail = RuntimeError("/secret/path/engine.py pid 4242 actor abc")
    r = _post(client, {"model": "m", "prompt": "hi"})
    assert r.status_code == 500
    message = r.json()["error"]["message"]
    assert "secret" not in message and "4242" not in message and "incident" in message


def test_keys_guard_every_route_but_health(keyed_api):
    ingress, client = keyed_api
    body = {"model": "m", "prompt": "hi"}
    for headers in ({}, {"authorization": "Bearer sk-wrong-" + "c" * 24},
                    {"authorization": KEY}, {"authorization": "Basic " + KEY}):
        r = _post(client, body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        for path in ("/v1/models", "/metrics", "/openapi.json"):
            assert client.get(path, headers=headers).status_code == 401
    assert ingress.client.opened == []
    assert client.get("/health").status_code == 200  # auth_health: false
    ok = {"authorization": f"Bearer {KEY}"}
    assert _post(client, body, headers=ok).status_code == 200
    assert client.get("/v1/models", headers=ok).status_code == 200
    assert client.get("/metrics", headers=ok).status_code == 200


def test_tenants_get_their_own_cache_namespace(keyed_api):
    ingress, client = keyed_api
    salt = f"s{random.randrange(1000)}"
    for key, body_salt in ((KEY, None), (OTHER, None), (KEY, salt), (OTHER, salt)):
        body = {"model": "m", "prompt": "hi", **({"cache_salt": body_salt} if body_salt else {})}
        assert _post(client, body, headers={"authorization": f"Bearer {key}"}).status_code == 200
    salts = [params.cache_salt for _, params in ingress.client.opened]
    assert len(set(salts)) == 4  # a tenant cannot name another's namespace with a salt
    assert salts[0].startswith("tenant-a") and salts[2].endswith(salt)


def test_openapi_describes_the_request_bodies(open_api):
    _, client = open_api
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]
    assert "messages" in ref["properties"]
    assert "ChatMessage" in schema["components"]["schemas"]


def test_keys_file_and_environment(tmp_path, monkeypatch):
    path = tmp_path / "keys"
    path.write_text(f"# comment\n{KEY} team-a\n\n{OTHER}  # no tenant\n")
    assert parse_keys_file(str(path)) == [(KEY, "team-a"), (OTHER, None)]
    monkeypatch.setenv("OPTGPTQ_API_KEYS", "sk-env-" + "d" * 20)
    keys = collect_keys([], str(path))
    assert len(keys) == 3 and keys[digest(KEY)] == "team-a"
    assert keys[digest(OTHER)].startswith("key-")  # its own tenant
    with pytest.raises(ValueError, match="16 characters"):
        collect_keys(["short"], None)
    path.write_text("a b c\n")
    with pytest.raises(ValueError, match="keys:1"):
        parse_keys_file(str(path))
    monkeypatch.delenv("OPTGPTQ_API_KEYS")
    with pytest.raises(ValueError, match="set API keys"):
        IngressConfig(host="0.0.0.0").keys()
    assert IngressConfig(host="::1").keys() == {}
    assert len(IngressConfig(host="10.1.2.3", api_keys=[KEY]).keys()) == 1


# -- gRPC ------------------------------------------------------------------------------------
def _grpc_call(ingress, method: str, raw: bytes, metadata=()):
    """One call to a real grpc.aio server (loopback) serving GRPCService over ``ingress``."""
    async def run():
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4096)])
        server.add_generic_rpc_handlers((grpc_handlers(GRPCService(ingress)),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                kind = channel.unary_stream if method == "GenerateStream" else channel.unary_unary
                call = kind(f"/optgptq.OptGPTQ/{method}",
                            response_deserializer=pb.GenerateResponse.FromString)
                try:
                    if method == "GenerateStream":  # every response, in order
                        return grpc.StatusCode.OK, [r async for r in call(raw, metadata=metadata)]
                    return grpc.StatusCode.OK, await call(raw, metadata=metadata)
                except grpc.aio.AioRpcError as err:
                    return err.code(), err.details()
        finally:
            await server.stop(0)
    return asyncio.run(run())


def test_grpc_malformed_oversized_and_unauthenticated():
    ingress = _ingress({digest(KEY): "tenant-a"})
    good = pb.GenerateRequest(model="m", prompt="hi", cache_salt="s").SerializeToString()
    auth = (("authorization", f"Bearer {KEY}"),)
    code, reply = _grpc_call(ingress, "Generate", good, auth)
    assert code == grpc.StatusCode.OK and reply.text == "hello" and reply.replica == ""
    assert ingress.client.opened[-1][1].cache_salt == "tenant-a\x00s"
    for raw in (b"\xff\xff\xff\xff", b"\x12\x05ab", b"\x0a\x02\xc3\x28"):  # bad tag, short, bad utf-8
        code, details = _grpc_call(ingress, "Generate", raw, auth)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (raw, details)
    code, _ = _grpc_call(ingress, "Generate", good + b"\x12" + bytes([0x80, 0x40]) + b"x" * 8192,
                         auth)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # over the size limit, never decoded
    code, _ = _grpc_call(ingress, "Generate", good)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert len(ingress.client.opened) == 1


def test_grpc_engine_fields_top_logprobs_and_n():
    ingress = _ingress({})
    request = pb.GenerateRequest(model="m", prompt="hi", logprobs=True, top_logprobs=2,
                                 presence_penalty=0.5, repetition_penalty=1.25, min_tokens=1,
                                 logit_bias={5: -100.0})
    code, reply = _grpc_call(ingress, "Generate", request.SerializeToString())
    assert code == grpc.StatusCode.OK, reply
    params = ingress.client.opened[-1][1]
    assert (params.presence_penalty, params.repetition_penalty, params.min_tokens,
            params.logit_bias, params.top_logprobs) == (0.5, 1.25, 1, {5: -100.0}, 2)
    assert [(t.token_id, [(a.token_id, a.token, a.logprob) for a in t.top])
            for t in reply.logprobs] == [(7, [(7, "h", -0.5), (8, "i", -1.5)]),
                                         (11, [(11, "l", -1.5), (12, "m", -2.5)])]
    request = pb.GenerateRequest(model="m", messages=[pb.ChatMessage(role="user", content="x")],
                                 n=2)
    code, details = _grpc_call(ingress, "Generate", request.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "GenerateStream" in details
    code, replies = _grpc_call(ingress, "GenerateStream", request.SerializeToString())
    assert code == grpc.StatusCode.OK
    for index in (0, 1):
        assert "".join(r.text for r in replies if r.index == index) == "hello"
    for bad in ({"top_logprobs": 3}, {"presence_penalty": 3.0}, {"n": 0}):
        request = pb.GenerateRequest(model="m", prompt="hi", **bad)
        code, details = _grpc_call(ingress, "GenerateStream", request.SerializeToString())
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (bad, details)


def test_an_oversized_body_is_refused_before_it_is_read(open_api):
    ingress, client = open_api
    limit = ingress.max_request_bytes
    big = b'{"model": "m", "prompt": "' + b"x" * limit + b'"}'
    r = _post(client, None, raw=big)  # Content-Length says so: nothing is read
    assert r.status_code == 413 and str(len(big)) in r.json()["error"]["message"]

    def chunks():  # no Content-Length: refused once the stream passes the limit
        for _ in range(limit // 4096 + 2):
            yield b"x" * 4096
    r = client.post("/v1/completions", content=chunks(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "more than" in r.json()["error"]["message"]
    assert ingress.client.opened == []


def test_grpc_structured_output_fields():
    ingress = _ingress({})
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    request = pb.GenerateRequest(model="m", prompt="hi", response_format_json=json.dumps(fmt))
    code, reply = _grpc_call(ingress, "Generate", request.SerializeToString())
    assert code == grpc.StatusCode.OK, reply
    spec = ingress.client.opened[-1][1].structured
    assert (spec.kind, json.loads(spec.spec), spec.strict) == ("json_schema", schema, True)
    request = pb.GenerateRequest(model="m", prompt="hi",
                                 structured_outputs_json='{"regex": "[0-9]+"}')
    code, reply = _grpc_call(ingress, "Generate", request.SerializeToString())
    assert code == grpc.StatusCode.OK and ingress.client.opened[-1][1].structured.kind == "regex"
    opened = len(ingress.client.opened)
    for bad in ({"response_format_json": "{oops"}, {"response_format_json": "[1]"},
                {"response_format_json": '{"type": "json_schema", "json_schema": '
                                         '{"name": "x", "schema": {"type": "nonsense"}}}'}):
        request = pb.GenerateRequest(model="m", prompt="hi", **bad)
        code, details = _grpc_call(ingress, "Generate", request.SerializeToString())
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "response_format" in details, details
    assert len(ingress.client.opened) == opened


WEATHER = pb.Tool(name="get_weather", description="The weather in a city",
                  parameters_json=json.dumps({"type": "object", "required": ["city"],
                                              "properties": {"city": {"type": "string"}}}))
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _calls(reply) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in reply.tool_calls]


def test_grpc_tool_calls_parsed_as_over_http():
    """Tools reach the chat template as /v1/chat/completions gives them; the output's calls come
    back parsed (Generate: all at once; GenerateStream: in output order, the finish reason on
    the last response), and a stream reassembles to the unary reply."""
    ingress = _ingress({})
    ingress.client.text = ["Let me look. <tool_", CALL[len("<tool_"):]]
    ingress.client.finish_reason = "stop"
    user = pb.ChatMessage(role="user", content="Weather in Paris?")
    request = pb.GenerateRequest(model="m", messages=[user], tools=[WEATHER], logprobs=True)
    code, reply = _grpc_call(ingress, "Generate", request.SerializeToString())
    assert code == grpc.StatusCode.OK, reply
    assert (reply.text, _calls(reply), reply.finish_reason) == (
        "Let me look.", [("get_weather", {"city": "Paris"})], "tool_calls")
    assert len(reply.logprobs) == 2 and reply.tool_calls[0].id.startswith("call_")
    assert ingress.client.tools[-1] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": json.loads(WEATHER.parameters_json)}}]
    code, replies = _grpc_call(ingress, "GenerateStream", request.SerializeToString())
    assert code == grpc.StatusCode.OK, replies
    assert [(r.text, _calls(r), r.finish_reason) for r in replies] == [
        ("Let me look.", [], ""), ("", [("get_weather", {"city": "Paris"})], "tool_calls")]
    assert sum(len(r.logprobs) for r in replies) == 2
    none = pb.GenerateRequest(model="m", messages=[user], tools=[WEATHER],
                              tool_choice_mode="none")
    code, reply = _grpc_call(ingress, "Generate", none.SerializeToString())
    assert (reply.text, list(reply.tool_calls), reply.finish_reason) == (
        "Let me look. " + CALL, [], "stop")
    assert ingress.client.tools[-1] is not None  # rendered all the same, as OpenAI does


def test_grpc_tool_messages_choice_and_errors():
    ingress = _ingress({})
    history = [pb.ChatMessage(role="user", content="Weather in Paris?"),
               pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(
                   id="call_1", name="get_weather", arguments='{"city": "Paris"}')]),
               pb.ChatMessage(role="tool", content="sunny", tool_call_id="call_1")]
    request = pb.GenerateRequest(model="m", messages=history, tools=[WEATHER],
                                 tool_choice_function="get_weather")
    code, reply = _grpc_call(ingress, "Generate", request.SerializeToString())
    assert code == grpc.StatusCode.OK, reply
    assert ingress.client.prompts[-1][1:] == [
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    assert ingress.client.opened[-1][1].structured.kind == "structural_tag"
    opened = len(ingress.client.opened)
    user = pb.ChatMessage(role="user", content="x")
    for bad, param in [
            ({"prompt": "hi", "tools": [WEATHER]}, "tools"),
            ({"messages": [user], "tools": [WEATHER], "tool_choice_function": "get_time"},
             "tool_choice"),
            ({"messages": [user], "tool_choice_mode": "required"}, "tool_choice"),
            ({"messages": [user], "tools": [WEATHER], "tool_choice_mode": "sometimes"},
             "tool_choice"),
            ({"messages": [user], "tools": [pb.Tool(name="f", parameters_json="{oops")]},
             "tools"),
            ({"messages": [user, pb.ChatMessage(role="tool", content="sunny")]}, "messages"),
            ({"messages": [user, pb.ChatMessage(role="user", content="x", tool_calls=[
                pb.ToolCall(id="c", name="f", arguments="{}")])]}, "messages")]:
        request = pb.GenerateRequest(model="m", **bad)
        code, details = _grpc_call(ingress, "GenerateStream", request.SerializeToString())
        assert code == grpc.StatusCode.INVALID_ARGUMENT and param in details, (bad, details)
    assert len(ingress.client.opened) == opened
