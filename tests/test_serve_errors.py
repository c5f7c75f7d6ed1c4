"""How failures from the handle, the replicas and validation reach clients (no Ray cluster)."""

from __future__ import annotations

import pickle
import random

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("ray.serve")
from ray.exceptions import ActorDiedError, RayTaskError  # noqa: E402
from ray.serve.exceptions import BackPressureError  # noqa: E402

from deployments.engine_client import api_error  # noqa: E402
from deployments.grpc_api import status_code  # noqa: E402
from optgptq.serving.openai_requests import CompletionRequest  # noqa: E402
from optgptq.serving.protocol import APIError  # noqa: E402


def test_replica_errors_cross_processes_intact():
    err = APIError(400, f"max_tokens={random.randint(1, 99)} is too many", param="max_tokens")
    back = pickle.loads(pickle.dumps(err))
    assert (back.status, back.message, back.param) == (400, err.message, "max_tokens")
    wrapped = RayTaskError("generate", "traceback", err)
    assert api_error(wrapped).body() == err.body()


@pytest.mark.parametrize("exc,status,code", [
    (BackPressureError(num_queued_requests=2, max_queued_requests=2), 429, "queue_full"),
    (ActorDiedError(), 503, "replica_died"),
    (RuntimeError("boom"), 500, "internal_error"),
])
def test_handle_failures_map_to_statuses(exc, status, code):
    err = api_error(exc)
    assert (err.status, err.code) == (status, code)
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("err,code", [
    (APIError(400, "bad", param="top_p"), grpc.StatusCode.INVALID_ARGUMENT),
    (APIError(401, "key", code="invalid_api_key"), grpc.StatusCode.UNAUTHENTICATED),
    (APIError(413, "long", param="prompt"), grpc.StatusCode.INVALID_ARGUMENT),
    (APIError(404, "no model", param="model"), grpc.StatusCode.NOT_FOUND),
    (APIError(429, "queue full", code="queue_full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (APIError(503, "engine queue full", code="overloaded"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (APIError(503, "died", code="replica_died"), grpc.StatusCode.UNAVAILABLE),
    (APIError(500, "boom", code="internal_error"), grpc.StatusCode.INTERNAL),
])
def test_grpc_status_codes(err, code):
    assert status_code(err) == code


def test_values_the_engine_rejects_are_400_naming_the_field():
    body = CompletionRequest(model="m", prompt="hi", stop=["ok", ""])
    with pytest.raises(APIError) as err:
        body.sampling_params()
    assert err.value.status == 400 and err.value.param == "stop"


def test_a_request_no_replica_takes_in_time_gets_503_with_retry_after():
    """The wait for a replica is bounded; the engine's acceptance after routing is not."""
    import asyncio
    from types import SimpleNamespace

    from deployments.engine_client import EngineClient
    from deployments.http_api import error_response
    from optgptq.engine.sampling_params import SamplingParams
    from optgptq.engine.sequence import RequestLimits
    from optgptq.serving.metrics import ServingMetrics

    cancelled = []

    class Call:
        """A generate call: routed after ``routed_s`` (None: never), accepted ``accept_s``
        later."""

        def __init__(self, routed_s, accept_s):
            self.delays = [routed_s, accept_s]

        def __aiter__(self):
            return self

        async def __anext__(self):
            delay = self.delays.pop(0) if self.delays else None  # then it runs on
            if delay is None:
                await asyncio.get_running_loop().create_future()
            await asyncio.sleep(delay)
            return "replica-1" if len(self.delays) == 1 else "accepted"

        def cancel(self):
            cancelled.append(True)

    async def info(timeout=None):
        return {"max_model_len": 64, "vocab_size": 100,
                "limits": RequestLimits(100, 64, 16, 1000, 1, True)}

    async def never(*args):
        await asyncio.get_running_loop().create_future()
        yield []

    async def main(routed_s, accept_s):
        handle = SimpleNamespace(generate=SimpleNamespace(remote=lambda r: Call(routed_s, accept_s)),
                                 subscribe=SimpleNamespace(remote=never))
        handle.options = lambda **kw: handle
        client = EngineClient(handle, tokenizer=None, metrics=ServingMetrics(),
                              admission_timeout_s=0.2)
        client.model_info = info
        try:
            return await asyncio.wait_for(client.open([1, 2, 3], SamplingParams()), 5), client
        except APIError as err:
            return err, client

    err, client = asyncio.run(main(None, 0))  # never routed: Serve's queue is full
    assert (err.status, err.code) == (503, "overloaded") and cancelled == [True]
    assert client.channels.streams == {}  # nothing left waiting for chunks
    assert error_response(err).headers["retry-after"] == "1"
    streams, _ = asyncio.run(main(0, 0.5))  # routed at once, the engine took 0.5 s: fine
    assert streams[0].replica == "replica-1" and cancelled == [True]
