"""The deployment end to end: a real Ray Serve on loopback, two engine replicas of a tiny model.

The replicas run on the CPU, or where a GPU is visible, both on it (``num_gpus: 0.5``).

Ray and Serve start once for this module and tests/test_openai_sdk.py (``serve_app`` in
tests/conftest.py). Tests run in file order, after the SDK suite's; the replica-kill test is last.
"""

from __future__ import annotations

import http.client
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")
from ray import serve  # noqa: E402

from optgptq.client import ClientError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONTEXT = 512  # the tiny models' max_position_embeddings
BS = 16


@pytest.fixture
def server(serve_app):
    """The deployment (tests/conftest.py: one for this module and tests/test_openai_sdk.py)."""
    return serve_app


@pytest.fixture
def rng():
    return random.Random()


def _words(rng: random.Random, n: int) -> str:
    vocab = ["paged", "cache", "block", "river", "token", "quiet", "router", "lamp", "north",
             "yellow", "engine", "grain", "seven", "tower", "signal", "maple"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 49152) for _ in range(n)]


def _replica_stats() -> dict[str, dict]:
    return serve.get_deployment_handle("PrefixIndex", "optgptq").replica_stats.remote().result()


def _post(port: int, path: str, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    status, data = r.status, json.loads(r.read())
    conn.close()
    return status, data


def _open_stream(port: int, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": MODEL, "stream": True, **body}),
                 headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def test_models_health_and_metrics(server):
    http_client = server["http"]
    assert http_client.models() == [MODEL]
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    http_client.complete("hello", max_tokens=2)
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    for series in ("optgptq_requests_total", "optgptq_time_to_first_token_seconds_bucket",
                   "optgptq_inter_token_latency_seconds_bucket", "optgptq_prefix_hit_rate{",
                   "optgptq_replica_free_blocks{", "optgptq_generation_tokens_total"):
        assert series in text
    assert text.count("optgptq_replica_free_blocks{") == 2  # one series per replica


def test_http_unary_and_stream_agree(server, rng):
    http_client = server["http"]
    prompt = _words(rng, rng.randrange(5, 30))
    unary = http_client.complete(prompt, max_tokens=12, temperature=0, ignore_eos=True)
    assert unary["object"] == "text_completion"
    assert unary["usage"]["completion_tokens"] == 12 and unary["choices"][0]["finish_reason"] == "length"
    streamed = "".join(http_client.complete(prompt, stream=True, max_tokens=12, temperature=0,
                                            ignore_eos=True))
    assert streamed == unary["choices"][0]["text"]
    chat = http_client.chat(prompt, max_tokens=8, temperature=0, ignore_eos=True)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert "".join(http_client.chat(prompt, stream=True, max_tokens=8, temperature=0,
                                    ignore_eos=True)) == chat["choices"][0]["message"]["content"]


def test_grpc_unary_and_stream_agree_with_http(server, rng):
    prompt = _words(rng, rng.randrange(5, 30))
    reference = server["http"].complete(prompt, max_tokens=10, temperature=0, ignore_eos=True)
    unary = server["grpc"].generate(prompt, max_tokens=10, temperature=0, ignore_eos=True)
    assert unary.text == reference["choices"][0]["text"]
    assert unary.finish_reason == "length" and unary.completion_tokens == 10
    parts = list(server["grpc"].stream(prompt, max_tokens=10, temperature=0, ignore_eos=True))
    assert "".join(p.text for p in parts) == unary.text and parts[-1].finish_reason == "length"
    chat = server["grpc"].generate(prompt, chat=True, max_tokens=6, temperature=0,
                                   ignore_eos=True)
    http_chat = server["http"].chat(prompt, max_tokens=6, temperature=0, ignore_eos=True)
    assert chat.text == http_chat["choices"][0]["message"]["content"]


def test_cli_client_over_http_and_grpc(server, rng, capsys):
    from optgptq.cli import main

    prompt = _words(rng, rng.randrange(3, 12))
    common = ["--prompt", prompt, "--model", MODEL, "--max-tokens", "6"]
    assert main(["client", "--url", server["http"].url, *common]) == 0
    http_text = capsys.readouterr().out
    assert main(["client", "--grpc", server["grpc_target"], "--stream", *common]) == 0
    assert capsys.readouterr().out == http_text  # greedy both ways
    assert main(["client", "--url", server["http"].url, "--prompt", "x", "--model", "nope"]) == 1
    assert "404" in capsys.readouterr().err


BAD_HTTP = [
    (b'{"model": "tiny", "prompt": ', 400, None),
    (json.dumps({"model": MODEL}).encode(), 400, "prompt"),
    (json.dumps({"model": MODEL, "prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": -3}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 10 ** 9}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": CONTEXT}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": list(range(100, 100 + CONTEXT))}).encode(), 413, "prompt"),
    (json.dumps({"model": "gpt-17", "prompt": "hi"}).encode(), 404, "model"),
    (json.dumps({"model": MODEL, "prompt": "hi", "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"model": MODEL, "prompt": "hi", "stop": [""]}).encode(), 400, "stop"),
    (json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages"),
]


@pytest.mark.parametrize("body,status,param", BAD_HTTP)
def test_bad_http_input_gets_an_openai_error(server, body, status, param):
    path = "/v1/chat/completions" if b'"messages"' in body else "/v1/completions"
    got, data = _post(server["port"], path, body)
    assert got == status
    assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["message"]
    if param is not None:
        assert data["error"]["param"] == param


def test_oversized_body_and_unknown_path(server):
    got, data = _post(server["port"], "/v1/completions", b"{" + b" " * (2 << 20) + b"}")
    assert got == 413 and data["error"]["code"] == "request_too_large"
    got, data = _post(server["port"], "/v1/nothing", b"{}")
    assert got == 404 and "error" in data


@pytest.mark.parametrize("params,code", [
    ({"model": "gpt-17"}, "NOT_FOUND"),
    ({"max_tokens": -1}, "INVALID_ARGUMENT"),
    ({"max_tokens": CONTEXT}, "INVALID_ARGUMENT"),
    ({"top_p": 3.0}, "INVALID_ARGUMENT"),
])
def test_bad_grpc_input_gets_a_status(server, params, code):
    client = server["grpc"]
    model = params.pop("model", MODEL)
    client.model = model
    try:
        with pytest.raises(ClientError) as err:
            client.generate("hello", **params)
    finally:
        client.model = MODEL
    assert err.value.status == code and err.value.message


def test_shared_prefix_follows_its_holder_and_unrelated_prompts_spread(server, rng):
    http_client = server["http"]
    prefix = _ids(rng, 20 * BS)
    served, cached = set(), []
    for _ in range(5):
        out = http_client.complete(prefix + _ids(rng, rng.randrange(1, 12)), max_tokens=2)
        cached.append(out["usage"]["prompt_tokens_details"]["cached_tokens"])
        served.add(_last_replica(server, prefix + _ids(rng, 3)))
    assert len(served) == 1, served
    assert all(c >= 19 * BS for c in cached[1:])
    (holder,) = served
    deadline = time.monotonic() + 60  # the holder's cache events reach the router actor
    while _replica_stats()[holder]["indexed_blocks"] < 20:
        assert time.monotonic() < deadline, "cache events never reached the index"
        time.sleep(0.1)
    # Unrelated prompts tie on cost only between equally loaded replicas: wait until both report
    # an idle engine, then two routing-stats periods (0.5 s) so the routers see it too.
    stats = _replica_stats()
    while any(s["waiting"] or s["running"] for s in stats.values()) or len(stats) < 2:
        assert time.monotonic() < deadline, f"replicas never went idle: {stats}"
        time.sleep(0.1)
        stats = _replica_stats()
    time.sleep(1.0)
    spread = {_last_replica(server, _ids(rng, rng.randrange(20, 60))) for _ in range(16)}
    assert len(spread) == 2, (spread, _replica_stats())


def _last_replica(server, prompt: list[int]) -> str:
    conn, r = _open_stream(server["port"], {"prompt": prompt, "max_tokens": 1})
    replica = r.getheader("x-optgptq-replica")
    r.read()
    conn.close()
    return replica


def _wait_idle(replicas: set[str] | None = None, timeout_s: float = 120) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = _replica_stats()
        idle = {r: s for r, s in stats.items() if replicas is None or r in replicas}
        if idle and all(s["running"] == s["waiting"] == s["used_blocks"] == 0 for s in idle.values()):
            return stats
        assert time.monotonic() < deadline, f"replicas never went idle: {stats}"
        time.sleep(0.2)


def test_disconnect_aborts_the_request_and_frees_its_blocks(server, rng):
    before = _wait_idle()
    conn, r = _open_stream(server["port"], {"prompt": _ids(rng, 100), "max_tokens": 400,
                                            "ignore_eos": True})
    assert r.status == 200
    replica = r.getheader("x-optgptq-replica")
    assert r.readline().startswith(b"data: ")
    deadline = time.monotonic() + 60
    while _replica_stats()[replica]["used_blocks"] == 0:  # published every 0.1 s
        assert time.monotonic() < deadline, "the running request holds no blocks"
        time.sleep(0.1)
    conn.close()  # the client goes away mid-stream
    after = _wait_idle({replica})[replica]
    assert after["cancelled"] == before[replica]["cancelled"] + 1
    assert after["free_blocks"] == after["num_blocks"]


def test_n_choices_logprobs_and_logit_bias_end_to_end(server, rng):
    """n greedy choices (one engine request) each equal the single greedy answer, the prompt
    counted once; top logprobs and logit_bias cross Serve and the token channel; bad values are
    400s naming the field, some known only to the engine; a client leaving a stream of n
    choices frees all of their blocks."""
    port = server["port"]
    body = {"model": MODEL, "prompt": _ids(rng, 20), "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    _, one = _post(port, "/v1/completions", json.dumps(body).encode())
    status, many = _post(port, "/v1/completions",
                         json.dumps({**body, "n": 3, "logprobs": 2}).encode())
    assert status == 200 and [c["index"] for c in many["choices"]] == [0, 1, 2]
    assert {c["text"] for c in many["choices"]} == {one["choices"][0]["text"]}
    assert many["usage"]["prompt_tokens"] == 20 and many["usage"]["completion_tokens"] == 24
    top = many["choices"][0]["logprobs"]["top_logprobs"]
    assert len(top) == 8 and all(2 <= len(t) <= 3 for t in top)
    _, forced = _post(port, "/v1/completions", json.dumps(
        {**body, "logit_bias": {"4321": 100}, "logprobs": 0}).encode())
    assert len(set(forced["choices"][0]["logprobs"]["tokens"])) == 1
    for bad, param in (({"logit_bias": {"49152": 1}}, "logit_bias"), ({"n": 17}, "n"),
                       ({"min_tokens": 9}, "min_tokens")):
        status, error = _post(port, "/v1/completions", json.dumps({**body, **bad}).encode())
        assert (status, error["error"]["param"]) == (400, param), error
    before = _wait_idle()
    conn, r = _open_stream(port, {"prompt": _ids(rng, 50), "max_tokens": 400, "n": 3,
                                  "ignore_eos": True})
    replica = r.getheader("x-optgptq-replica")
    assert r.status == 200 and r.readline().startswith(b"data: ")
    deadline = time.monotonic() + 60
    while _replica_stats()[replica]["running"] < 3:  # published every 0.1 s
        assert time.monotonic() < deadline, "the choices never ran together"
        time.sleep(0.1)
    conn.close()
    after = _wait_idle({replica})[replica]
    assert after["cancelled"] == before[replica]["cancelled"] + 1
    assert after["free_blocks"] == after["num_blocks"]


@pytest.mark.slow
def test_overload_is_rejected_with_429_not_queued_without_bound(server, rng):
    def attempt(_):
        conn, r = _open_stream(server["port"], {"prompt": _ids(rng, 30), "max_tokens": 450,
                                                "ignore_eos": True})
        status = r.status
        body = r.readline() if status == 200 else r.read()
        return conn, status, body

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(attempt, range(24)))
    try:
        statuses = [s for _, s, _ in results]
        # 429: the router's queue is full; 503: queued, but no replica took it within
        # ingress.admission_timeout_s
        assert set(statuses) <= {200, 429, 503}, [b for _, s, b in results if s != 200][:3]
        # 2 replicas x 4 ongoing + 2 queued, and a few more where some of the first requests
        # (480 tokens of a tiny model: well under a second) finish while the burst is answered
        assert statuses.count(429) + statuses.count(503) >= 24 - 2 * 4 - 2 - 4
        rejected = next(json.loads(b) for _, s, b in results if s == 429)
        assert rejected["error"]["code"] == "queue_full"
    finally:
        for conn, _, _ in results:
            conn.close()
    _wait_idle()


@pytest.mark.slow
def test_killed_replica_fails_only_its_requests(server, rng):
    _wait_idle()
    streams = []  # long requests until both replicas hold one (the router spreads by load)
    while len({replica for _, _, replica in streams}) < 2:
        assert len(streams) < 6, "every request went to the same replica"
        conn, r = _open_stream(server["port"], {"prompt": _ids(rng, 40), "max_tokens": 300,
                                                "ignore_eos": True})
        assert r.readline().startswith(b"data: ")
        streams.append((conn, r, r.getheader("x-optgptq-replica")))
    victim = streams[0][2]
    ray.kill(ray.get_actor(f"SERVE_REPLICA::optgptq#EngineReplica#{victim}", namespace="serve"),
             no_restart=True)
    for conn, r, replica in streams:
        events = [json.loads(line[len(b"data: "):]) for line in r.read().split(b"\n")
                  if line.startswith(b"data: {")]
        if replica == victim:
            assert events[-1]["error"]["code"] == "replica_died"
        else:
            assert events[-1]["choices"][0]["finish_reason"] == "length"
        conn.close()
    for _ in range(6):  # new requests go to the live replicas
        assert server["http"].complete(_ids(rng, 20), max_tokens=2)["usage"]["completion_tokens"] == 2
