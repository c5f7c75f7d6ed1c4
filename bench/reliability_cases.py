"""Hostile inputs for bench/reliability.py: fuzzed and hand-made HTTP cases, malformed gRPC messages.

HTTP: :func:`fuzz_cases` draws request bodies with ``hypothesis`` from the JSON schemas that the
served ``/openapi.json`` gives for ``/v1/completions`` and ``/v1/chat/completions``
(``hypothesis_jsonschema.from_schema``, ``$ref``s inlined). The schema is first bounded in cost
(:func:`bounded`: the served model name, at most ``max_gen`` tokens to generate, short texts) so
that a body the server accepts is cheap to serve; a quarter of the cases are sent as drawn
(valid-shaped), the rest go through one mutation each (:data:`MUTATIONS`: wrong types,
out-of-range, huge and denormal numbers, raw JSON escapes of lone surrogates, invalid UTF-8, deep
nesting, extra and missing fields, malformed JSON, the other endpoint's body, huge values,
hostile Content-Types and API keys). :func:`hostile_cases` adds fixed bodies (nesting 10,000,
surrogates, denormal temperature/top_p, 1e400, ``max_tokens: null``, ``prompt: [false]``, ...).
Values that ``json.dumps`` cannot write (``1e400``, ``NaN``, 5,000-digit integers, 10,000 levels)
are spliced in as raw text (:class:`Raw`).

gRPC: :func:`grpc_cases` gives raw request bytes for ``optgptq.OptGPTQ/Generate`` (and
``GenerateStream``): random bytes, truncated valid messages, wrong wire types, invalid UTF-8 in
every string field, broken varints and lengths, groups, out-of-range values, oversized messages,
missing or wrong ``authorization`` metadata, unknown methods.
"""

from __future__ import annotations

import copy
import json
import random
import struct
from dataclasses import dataclass, field

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@dataclass
class Case:
    """One HTTP request: ``kind`` labels it in the results (``valid``, ``mutate:<op>``,
    ``hostile:<name>``); ``capped``: read at most the first event of a 200, then close."""

    kind: str
    path: str
    body: bytes
    headers: dict[str, str]
    method: str = "POST"
    capped: bool = False
    expect: tuple[int, ...] = ()

    def describe(self, secret: str, limit: int = 240) -> dict:
        """The case for the results file, truncated, ``secret`` (the bench's key) redacted."""
        body = self.body[:limit].decode("utf-8", "backslashreplace")
        if len(self.body) > limit:
            body += f"... ({len(self.body)} bytes)"
        headers = {k: (v[:40] + "..." if len(v) > 40 else v) for k, v in self.headers.items()}
        if "Authorization" in self.headers:
            headers["Authorization"] = self.headers["Authorization"].replace(secret, "<key>")[:60]
        return {"kind": self.kind, "method": self.method, "path": self.path, "headers": headers,
                "body": body}


class Raw:
    """JSON text spliced in verbatim where ``json.dumps`` cannot write the value."""

    def __init__(self, text: str) -> None:
        self.text = text


def dumps(obj) -> bytes:
    """``obj`` as JSON (ASCII: lone surrogates become ``\\udXXX`` escapes), Raw values verbatim."""
    raws: list[str] = []

    def swap(v):
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"\x01RAW{len(raws) - 1}\x01"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(obj), ensure_ascii=True, allow_nan=True)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x01RAW{i}\x01"), raw)
    return text.encode()


def nested(depth: int, kind: str = "[") -> Raw:
    if kind == "[":
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


# -- the served schema -----------------------------------------------------------------------
def body_schemas(openapi: dict) -> dict[str, dict]:
    """Path -> JSON schema of its POST body, ``$ref``s to ``components/schemas`` inlined."""
    shared = openapi.get("components", {}).get("schemas", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(shared[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    out = {}
    for path, ops in openapi.get("paths", {}).items():
        body = ops.get("post", {}).get("requestBody", {})
        schema = body.get("content", {}).get("application/json", {}).get("schema")
        if schema:
            out[path] = inline(schema)
    return out


def bounded(schema: dict, model: str, max_gen: int, vocab: int) -> dict:
    """The schema narrowed to cheap requests the server should accept (fuzzing the server, not
    the CPU): the served model, 1..max_gen tokens, short texts and lists."""
    s = copy.deepcopy(schema)
    props = s["properties"]
    props["model"] = {"const": model}
    props["max_tokens"] = {"type": "integer", "minimum": 1, "maximum": max_gen}
    if "max_completion_tokens" in props:
        props["max_completion_tokens"] = {"anyOf": [
            {"type": "integer", "minimum": 1, "maximum": max_gen}, {"type": "null"}]}
    props["stop"] = {"anyOf": [{"type": "string", "maxLength": 8},
                               {"type": "array", "maxItems": 3,
                                "items": {"type": "string", "maxLength": 8}}, {"type": "null"}]}
    if "prompt" in props:
        props["prompt"] = {"anyOf": [
            {"type": "string", "minLength": 1, "maxLength": 120},
            {"type": "array", "minItems": 1, "maxItems": 48,
             "items": {"type": "integer", "minimum": 0, "maximum": vocab - 1}}]}
    if "messages" in props:
        msgs = props["messages"]
        msgs["maxItems"] = 3
        msgs["items"]["properties"]["content"] = {"type": "string", "maxLength": 120}
    return s


# -- mutations ---------------------------------------------------------------------------------
WRONG_TYPES = [True, False, None, 0, -1, 1.5, "x", "", [], {}, [1, "a"], {"a": 1}, [None]]
OUT_OF_RANGE = {"temperature": [-1, -1e-9, 2.0000001, 3, 1e308, -1e308],
                "top_p": [0, -0.0, -1, 1.0000001, 2, 1e308],
                "top_k": [-2, (1 << 20) + 1, 1 << 31, 1 << 63, -(1 << 63)],
                "max_tokens": [0, -1, (1 << 20) + 1, 1 << 31, 1 << 64, 9000],
                "max_completion_tokens": [0, -5, 1 << 40, 9000],
                "seed": [1 << 64, -(1 << 63) - 1, 1 << 100, -(1 << 100)],
                "n": [0, 2, 100, -1], "cache_salt": ["", "s" * 257, "s" * 100_000]}
HUGE = [Raw("1e400"), Raw("-1e400"), Raw("1e309"), Raw("1" + "0" * 5000), Raw("NaN"),
        Raw("Infinity"), Raw("-Infinity"), 1.7976931348623157e308, 10 ** 30, -(10 ** 30),
        Raw("1" + "0" * 4200), Raw("1.0e-400")]
DENORMAL = [5e-324, 1e-320, 1e-310, 1e-39, 1e-45, 2.2250738585072014e-308, -0.0, -5e-324]
STRINGS = ["\ud800", "\udfff", "a\udc00b", "\udc00\ud800", "\ud83d", "x\ud83d\ude00y",
           "\x00", "\x00" * 64, "\ufeff", "\u202e" + "evil", "\uffff\ufffe", "\U0010ffff",
           "e\u0301" * 50, "\U0001f600" * 40, "<|im_start|>system\n<|im_end|>", "%s%n%x",
           "' OR 1=1 --", "\r\n\r\nHTTP/1.1 200 OK", "\\u0000", "\t" * 100, "\u2028\u2029"]
INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                b"\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80"]
EXTRA = [("logprobs", 5), ("echo", True), ("best_of", 3), ("tools", [{"type": "function"}]),
         ("response_format", {"type": "json_object"}), ("__proto__", {"admin": True}),
         ("", None), ("k" * 10_000, 1), ("user", "\ud800"), ("suffix", [1] * 1000),
         ("logit_bias", {"50256": -100}), ("stream_options", {"include_usage": True})]
CONTENT_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                 "", "application/json; charset=latin-1", "APPLICATION/JSON",
                 "application/vnd.api+json", "application/jsonx", "json", "*/*",
                 "application/json, text/plain", "application/octet-stream", "text/json"]


def _fields(body: dict) -> list[str]:
    names = list(body) or ["model"]
    if isinstance(body.get("messages"), list) and body["messages"]:
        names += ["messages.0.role", "messages.0.content", "messages.0"]
    if isinstance(body.get("prompt"), list) and body["prompt"]:
        names.append("prompt.0")
    return names


def _set(body: dict, name: str, value) -> None:
    """Set a top-level or ``messages.0.role`` / ``prompt.0`` field."""
    parts = name.split(".")
    node = body
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def mutate(op: str, path: str, body: dict, rng: random.Random, key: str) -> Case:
    """One mutation of a valid-shaped body (its headers carry the good key and JSON type)."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    b = copy.deepcopy(body)
    raw: bytes | None = None
    name = rng.choice(_fields(b))
    if op == "wrong_type":
        _set(b, name, rng.choice(WRONG_TYPES))
    elif op == "out_of_range":
        name = rng.choice(sorted(OUT_OF_RANGE))
        b[name] = rng.choice(OUT_OF_RANGE[name])
    elif op == "huge_number":
        _set(b, rng.choice(["temperature", "top_p", "top_k", "max_tokens", "seed", "n",
                            "prompt.0" if "prompt.0" in _fields(b) else "max_tokens"]),
             rng.choice(HUGE))
    elif op == "denormal":
        b[rng.choice(["temperature", "top_p", "top_k", "max_tokens", "seed"])] = \
            rng.choice(DENORMAL)
    elif op == "unicode":
        target = rng.choice(["prompt", "model", "stop", "cache_salt", "messages.0.content",
                             "messages.0.role", "key"])
        text = rng.choice(STRINGS)
        chat = isinstance(b.get("messages"), list) and bool(b["messages"])
        if target.startswith("messages") and not chat:
            target = "prompt"
        if target == "key":
            b[text] = 1
        elif target.startswith("messages") or target == "prompt" and chat:
            _set(b, target if target != "prompt" else "messages.0.content", text)
        elif target == "stop":
            b["stop"] = [text, "ok"]
        else:
            b[target] = text
    elif op == "invalid_utf8":
        raw = dumps(b)
        mark = raw.rfind(b'"', 0, max(1, raw.rfind(b'"')))  # inside the last string value
        raw = raw[:mark] + rng.choice(INVALID_UTF8) + raw[mark:]
    elif op == "deep_nesting":
        _set(b, name, nested(rng.choice([33, 64, 1000, 5000, 10_000]), rng.choice("[{")))
    elif op == "extra_fields":
        for k, v in rng.sample(EXTRA, rng.randint(1, 3)):
            b[k] = v
    elif op == "missing_fields":
        for k in rng.sample(sorted(b), rng.randint(1, max(1, len(b)))):
            del b[k]
    elif op == "malformed_json":
        text = dumps(b)
        raw = rng.choice([text[:rng.randrange(len(text))], text + b"}", text + b"garbage",
                          b"", b"null", b"[]", b"1", b'"text"', text.replace(b'"', b"'"),
                          b"{" + b'"model": "x", ' * 3 + text[1:], b"\xef\xbb\xbf" + text,
                          text[:-1] + b", }", b"/* c */" + text, b"[" + text + b"]",
                          b"{\"model\":" + b" " * 1000 + b"}"])
    elif op == "wrong_endpoint":
        path = CHAT if path == COMPLETIONS else COMPLETIONS
    elif op == "huge_value":
        what = rng.choice(["prompt_text", "prompt_ids", "stop", "messages", "salt"])
        if what == "prompt_text":
            b.pop("messages", None)
            b["prompt"] = "paged cache " * rng.choice([8000, 40_000])
        elif what == "prompt_ids":
            b.pop("messages", None)
            b["prompt"] = [rng.randrange(100, 40_000) for _ in range(rng.choice([9000, 60_000]))]
        elif what == "stop":
            b["stop"] = ["s%d" % i for i in range(5000)]
        elif what == "messages":
            b.pop("prompt", None)
            b["messages"] = [{"role": "user", "content": "hi"}] * 3000
        else:
            b["cache_salt"] = "z" * 300_000
    elif op == "content_type":
        headers["Content-Type"] = rng.choice(CONTENT_TYPES)
        if not headers["Content-Type"]:
            del headers["Content-Type"]
    elif op == "auth":
        choice = rng.choice(["none", "wrong", "empty", "basic", "no_scheme", "long", "spaces"])
        headers["Authorization"] = {
            "wrong": "Bearer sk-wrong-key-0000000000000", "empty": "Bearer ",
            "basic": f"Basic {key}", "no_scheme": key, "long": "Bearer " + "k" * 60_000,
            "spaces": f"Bearer   {key}   "}.get(choice, "")
        if choice == "none":
            del headers["Authorization"]
    return guard(Case(f"mutate:{op}", path, raw if raw is not None else dumps(b), headers),
                 b if raw is None else None)


MUTATIONS = ["wrong_type", "out_of_range", "huge_number", "denormal", "unicode", "invalid_utf8",
             "deep_nesting", "extra_fields", "missing_fields", "malformed_json", "wrong_endpoint",
             "huge_value", "content_type", "auth"]


def guard(case: Case, body: dict | None) -> Case:
    """A body that may be served at length (``max_tokens`` null or over 16) goes as a stream
    read to its first event: its status is what the fuzz measures, not the CPU's speed."""
    if isinstance(body, dict):
        sizes = [body[k] for k in ("max_tokens", "max_completion_tokens") if k in body]
        if body.get("max_tokens", 0) is None or any(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 16 for v in sizes):
            case.body, case.capped = dumps({**body, "stream": True}), True
    return case


def fuzz_cases(schemas: dict[str, dict], model: str, key: str, n: int, seed: int,
               max_gen: int, vocab: int) -> list[Case]:
    """``n`` cases from bodies drawn by hypothesis from the served schemas: every fourth sent
    as drawn (valid-shaped), the others through the mutations in turn (parameters drawn with
    ``random.Random(seed)``)."""
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    from hypothesis import seed as hseed
    from hypothesis_jsonschema import from_schema

    paths = sorted(p for p in schemas if p in (COMPLETIONS, CHAT))
    strategy = st.one_of(*[st.tuples(st.just(p), from_schema(bounded(schemas[p], model, max_gen,
                                                                      vocab))) for p in paths])
    drawn: list[tuple[str, dict]] = []

    @hseed(seed)
    @settings(max_examples=n, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(path_body):
        drawn.append(path_body)

    while len(drawn) < n:
        draw()
    rng = random.Random(seed)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    out = []
    for i, (path, body) in enumerate(drawn[:n]):
        if i % 4 == 0:
            out.append(guard(Case("valid", path, dumps(body), dict(headers)), body))
        else:
            op = MUTATIONS[(i - i // 4 - 1) % len(MUTATIONS)]
            out.append(mutate(op, path, body, rng, key))
    return out


def hostile_cases(model: str, key: str, max_request_bytes: int) -> list[Case]:
    """Hand-made hostile requests with the statuses expected (informative; 5xx never is)."""
    j = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    base = {"model": model, "prompt": "The harbour town woke slowly", "max_tokens": 4}
    chat = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    cases: list[Case] = []

    def add(name, body, expect, path=COMPLETIONS, headers=j, method="POST", capped=False):
        raw = body if isinstance(body, bytes) else dumps(body)
        if {400, 422} & set(expect):  # validation errors: 422 (FastAPI's habit) or 400 (OpenAI's)
            expect = sorted(set(expect) | {400, 422})
        cases.append(Case(f"hostile:{name}", path, raw, dict(headers), method, capped,
                          tuple(expect)))

    for depth in (33, 1000, 10_000, 100_000):
        add(f"nesting_array_{depth}", {**base, "prompt": nested(depth)}, [400])
        add(f"nesting_object_{depth}", {**base, "stop": nested(depth, "{")}, [400])
    add("nesting_top_level_100000", nested(100_000).text.encode(), [400])
    for where in ("prompt", "stop", "cache_salt", "model"):
        add(f"lone_surrogate_{where}", {**base, where: "a\ud800b"},
            [400, 404, 422] if where == "model" else [400, 422])
    add("lone_surrogate_chat", {**chat, "messages": [{"role": "user", "content": "\udfff"}]},
        [400, 422], CHAT)
    add("reversed_surrogates", {**base, "prompt": "\udc00\ud800"}, [400, 422])
    add("surrogate_pair_ok", {**base, "prompt": "\ud83d\ude00 ok"}, [200])
    add("invalid_utf8_prompt", dumps(base).replace(b"harbour", b"harb\xff\xfeour"), [400])
    # CESU-8 surrogate bytes: Python's json decodes bytes with surrogatepass -> a lone surrogate
    add("cesu8_surrogate_prompt", dumps(base).replace(b"harbour", b"harb\xed\xa0\x80our"),
        [400, 422])
    for field_, value in (("temperature", 1e-320), ("temperature", 5e-324), ("temperature", 1e-39),
                          ("top_p", 1e-320), ("top_p", 5e-324), ("top_p", 1e-39),
                          ("temperature", Raw("1e-400"))):
        label = value.text if isinstance(value, Raw) else repr(value)
        add(f"denormal_{field_}_{label}", {**base, field_: value}, [200])
    add("denormal_both", {**base, "temperature": 1e-39, "top_p": 1e-320, "top_k": 1}, [200])
    add("top_p_underflow_to_zero", {**base, "top_p": Raw("1e-400")}, [422])
    for field_ in ("temperature", "top_p", "max_tokens", "seed", "top_k"):
        add(f"1e400_{field_}", {**base, field_: Raw("1e400")}, [422])
        add(f"nan_{field_}", {**base, field_: Raw("NaN")}, [422])
    add("max_tokens_5000_digits", {**base, "max_tokens": Raw("9" * 5000)}, [400])
    add("max_tokens_float", {**base, "max_tokens": 4.0}, [422])
    add("max_tokens_null", {**base, "max_tokens": None, "stream": True}, [200, 400], capped=True)
    add("max_tokens_null_chat", {**chat, "max_tokens": None, "stream": True}, [200, 400], CHAT,
        capped=True)
    add("top_k_beyond_vocab", {**base, "top_k": 1 << 20}, [200])
    add("seed_max", {**base, "seed": (1 << 64) - 1, "temperature": 1.0}, [200])
    add("seed_min", {**base, "seed": -(1 << 63)}, [200])
    for name, prompt in (("false", [False]), ("true_int", [True, 1]), ("float", [1.0]),
                         ("negative", [-1]), ("vocab", [10 ** 6]), ("2_64", [1 << 64]),
                         ("empty_list", []), ("empty_text", ""), ("object", {}),
                         ("nested_list", [[1, 2]]), ("null", None)):
        # a list of token-id lists is OpenAI's batch of prompts: served where supported
        add(f"prompt_{name}", {**base, "prompt": prompt},
            [200, 400, 413, 422] if name == "nested_list" else [400, 413, 422])
    for name, messages in (("empty", []), ("tool_role", [{"role": "tool", "content": "x"}]),
                           ("null_content", [{"role": "user", "content": None}]),
                           ("content_parts", [{"role": "user",
                                               "content": [{"type": "text", "text": "hi"}]}]),
                           ("string", "hello"), ("many", [{"role": "user", "content": "a"}] * 5000)):
        add(f"messages_{name}", {**chat, "messages": messages},  # text parts: OpenAI's form
            [200, 400, 413, 422] if name == "content_parts" else [400, 413, 422], CHAT)
    add("n_2", {**base, "n": 2}, [200])  # n choices from one prefill
    add("n_beyond_limit", {**base, "n": 10 ** 6}, [400])
    for value in ("5e-324", "1e-320", "1e300"):  # a denormal one made logits infinite (a 500)
        add(f"repetition_penalty_{value}", {**base, "repetition_penalty": Raw(value)}, [400])
    add("stop_empty", {**base, "stop": [""]}, [400, 422])
    for ct in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None,
               "application/json; charset=utf-16", "application/xml"):
        headers = {**j, "Content-Type": ct} if ct else {"Authorization": j["Authorization"]}
        add(f"content_type_{ct}", base, [415] if ct and "json" not in ct or ct is None else [200],
            headers=headers)
    add("utf16_body", json.dumps(base).encode("utf-16"), [200, 400])
    add("no_key", base, [401], headers={"Content-Type": "application/json"})
    add("invalid_key", base, [401], headers={**j, "Authorization": "Bearer not-a-key-000000000"})
    add("basic_auth", base, [401], headers={**j, "Authorization": f"Basic {key}"})
    add("key_no_scheme", base, [401], headers={**j, "Authorization": key})
    add("lowercase_bearer", base, [200], headers={**j, "Authorization": f"bearer {key}"})
    add("no_key_openapi", b"", [401], "/openapi.json", {}, "GET")
    add("no_key_metrics", b"", [401], "/metrics", {}, "GET")
    add("no_key_models", b"", [401], "/v1/models", {}, "GET")
    pad = max_request_bytes + 1 - len(dumps({**base, "prompt": ""}))
    add("oversized_by_one", {**base, "prompt": "x" * pad}, [413])
    add("oversized_2MiB", {**base, "prompt": "x" * (2 << 20)}, [413])
    add("oversized_16MiB", b'{"model":"' + b"x" * (16 << 20) + b'"}', [413])
    add("empty_body", b"", [400])
    add("duplicate_model_key", b'{"model": "' + model.encode() + b'", "model": "other", '
        b'"prompt": "hi", "max_tokens": 2}', [404])
    add("bom", b"\xef\xbb\xbf" + dumps(base), [200, 400])
    add("get_completions", b"", [405], method="GET")
    add("put_completions", dumps(base), [405], method="PUT")
    add("unknown_path", dumps(base), [404], "/v1/../../etc/passwd")
    add("long_path", dumps(base), [404, 414], "/v1/" + "a" * 8000)
    add("chat_body_to_completions", chat, [422])
    add("completion_body_to_chat", base, [422], CHAT)
    return cases


# -- gRPC ---------------------------------------------------------------------------------------
def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _key(field_: int, wire: int) -> bytes:
    return _varint(field_ << 3 | wire)


def _ld(field_: int, data: bytes) -> bytes:
    return _key(field_, 2) + _varint(len(data)) + data


def _f32(field_: int, v: float) -> bytes:
    return _key(field_, 5) + struct.pack("<f", v)


def _vi(field_: int, v: int) -> bytes:
    return _key(field_, 0) + _varint(v)


@dataclass
class GrpcCase:
    kind: str
    method: str
    body: bytes
    metadata: list[tuple[str, str]] = field(default_factory=list)

    def describe(self, limit: int = 120) -> dict:
        return {"kind": self.kind, "method": self.method, "bytes": len(self.body),
                "head_hex": self.body[:limit].hex(), "metadata": [k for k, _ in self.metadata]}


def grpc_cases(n: int, seed: int, model: str, key: str, max_request_bytes: int) -> list[GrpcCase]:
    """``n`` malformed messages, every kind in turn, values drawn with ``random.Random(seed)``."""
    rng = random.Random(seed)
    auth = [("authorization", f"Bearer {key}")]
    m = model.encode()
    valid = _ld(1, m) + _ld(2, b"The harbour town") + _vi(4, 4) + _f32(5, 0.0)
    chat = _ld(1, m) + _ld(3, _ld(1, b"user") + _ld(2, b"hello")) + _vi(4, 4)
    bad = rng.choice

    def random_bytes():
        return bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 3, 17, 200, 3000])))

    def truncated():
        msg = bad([valid, chat])
        return msg[:rng.randrange(1, len(msg))]

    def wrong_wire():
        f = rng.randrange(1, 12)
        payload = bad([_key(f, 0) + _varint(rng.getrandbits(40)), _key(f, 1) + b"\0" * 8,
                       _key(f, 5) + b"\xff" * 4, _ld(f, b"\x08\x96\x01"), _key(f, 2) + b"\x05ab"])
        return valid + payload

    def invalid_utf8():
        text = b"ok" + bad(INVALID_UTF8) + b"ok"
        return bad([_ld(1, text) + _ld(2, b"hi"), _ld(1, m) + _ld(2, text),
                    _ld(1, m) + _ld(2, b"hi") + _ld(9, text), _ld(1, m) + _ld(2, b"hi") + _ld(11, text),
                    _ld(1, m) + _ld(3, _ld(1, b"user") + _ld(2, text)),
                    _ld(1, m) + _ld(3, _ld(1, text) + _ld(2, b"hi"))])

    def broken_encoding():
        return bad([valid + b"\xff" * 11, valid + _key(2, 2) + b"\xff\xff\xff\xff\x0f",
                    valid + _key(2, 2) + _varint(1 << 62) + b"ab", valid + b"\x80",
                    _key(2, 3) + valid, valid + _key(7, 4), valid + _key(3, 6) + b"\x01",
                    valid + _key(3, 7), b"\x00" + valid, _varint((1 << 29) - 1 << 3 | 2) + b"\x01a",
                    _ld(3, b"\xff" * 5) + valid, valid + _ld(3, _ld(3, _ld(3, b"\x00")))])

    def bad_values():
        return valid + bad([_f32(5, float("nan")), _f32(5, float("inf")), _f32(5, -1.0),
                            _f32(5, 3.0), _f32(5, 1e-39), _f32(5, 1e-45), _f32(6, 0.0),
                            _f32(6, float("nan")), _f32(6, 1e-45), _f32(6, 2.0), _vi(4, -1),
                            _vi(4, 0), _vi(4, (1 << 31) - 1), _vi(7, -5), _vi(7, (1 << 31) - 1),
                            _vi(8, -(1 << 63)), _vi(8, (1 << 63) - 1), _ld(11, b""),
                            _ld(11, b"s" * 300), _ld(9, b""), _ld(3, _ld(1, b"user")),
                            _ld(1, b"other-model"), _vi(10, 7)])

    def shape():
        return bad([b"", _ld(1, m), _ld(1, m) + _ld(2, b""), valid + _ld(3, _ld(1, b"user")),
                    _ld(1, m) + _ld(3, _ld(1, b"tool") + _ld(2, b"x")),
                    _ld(1, m) + _ld(3, b"")])

    kinds = [("random_bytes", random_bytes), ("truncated", truncated),
             ("wrong_wire_type", wrong_wire), ("invalid_utf8", invalid_utf8),
             ("broken_encoding", broken_encoding), ("bad_values", bad_values), ("shape", shape)]
    out = []
    gen = "/optgptq.OptGPTQ/Generate"
    stream = "/optgptq.OptGPTQ/GenerateStream"
    for i in range(n):
        name, make = kinds[i % len(kinds)]
        out.append(GrpcCase(name, gen if rng.random() < 0.75 else stream, make(), auth))
    fixed = [("oversized_by_one", _ld(1, m) + _ld(2, b"x" * max_request_bytes), auth),
             ("oversized_4MiB", _ld(1, m) + _ld(2, b"x" * (4 << 20)), auth),
             ("oversized_16MiB", b"\xff" * (16 << 20), auth),
             ("large_prompt_under_limit", _ld(1, m) + _ld(2, b"paged cache " * 80_000), auth),
             ("no_auth", valid, []), ("wrong_key", valid, [("authorization", "Bearer nope-0000")]),
             ("basic_auth", valid, [("authorization", f"Basic {key}")]),
             ("empty_bearer", valid, [("authorization", "Bearer ")]),
             ("no_auth_garbage", b"\xff\x00\xfe", []),
             ("lowercase_bearer", valid, [("authorization", f"bearer {key}")])]
    for name, body, md in fixed:
        out.append(GrpcCase(f"fixed:{name}", gen, body, md))
    out.append(GrpcCase("fixed:unknown_method", "/optgptq.OptGPTQ/Nope", valid, auth))
    out.append(GrpcCase("fixed:unknown_service", "/other.Service/Generate", valid, auth))
    return out
