"""Readiness without Ray: the ingress's real engine client and readiness over a stand-in engine
deployment whose replicas load slowly. /health is 503 until every expected replica is
routable; a request before the first replica answers gets 503 with Retry-After at once (the
admission bound), never a stall; the engine core answers ready only after its warm-up."""

from __future__ import annotations

import asyncio
import time
import types

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("ray")

from deployments import token_channel  # noqa: E402
from deployments.app import IngressConfig  # noqa: E402
from deployments.auth import APIKeys  # noqa: E402
from deployments.engine_client import EngineClient  # noqa: E402
from deployments.http_api import build_http_app  # noqa: E402
from deployments.readiness import Readiness  # noqa: E402
from optgptq.engine.sequence import RequestLimits  # noqa: E402
from optgptq.serving.metrics import ServingMetrics  # noqa: E402

INFO = {"max_model_len": 512, "vocab_size": 1000, "num_blocks": 16,
        "limits": RequestLimits(1000, 512, 16, 16, 1, True)}


class SlowEngine:
    """The engine deployment's handle: model_info answers once ``load`` is done; channels
    stay open and silent."""

    def __init__(self) -> None:
        self.load = asyncio.get_running_loop().create_future()
        self.asked = 0
        self.model_info = types.SimpleNamespace(remote=self._model_info)
        self.subscribe = types.SimpleNamespace(remote=self._subscribe)

    def options(self, **_) -> SlowEngine:
        return self

    def _model_info(self):
        self.asked += 1
        return self.load

    async def _subscribe(self, _):
        await asyncio.Event().wait()
        yield []


def test_health_is_503_until_every_replica_is_ready():
    async def main() -> None:
        engine = SlowEngine()
        config = IngressConfig(admission_timeout_s=0.3)
        client = EngineClient(engine, types.SimpleNamespace(chat_template=None),
                              ServingMetrics(), config.admission_timeout_s)
        readiness = Readiness(client, expected=2)
        ingress = types.SimpleNamespace(client=client, metrics=ServingMetrics(),
                                        model_name="m", keys=APIKeys({}), config=config,
                                        readiness=readiness,
                                        max_request_bytes=config.max_request_bytes)
        watch = asyncio.ensure_future(readiness.watch())
        transport = httpx.ASGITransport(app=build_http_app(ingress))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            r = await http.get("/health")
            assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
            t0 = time.perf_counter()
            r = await http.post("/v1/completions", json={"model": "m", "prompt": [1, 2]})
            assert time.perf_counter() - t0 < 2.0  # bounded by admission_timeout_s, no stall
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert engine.asked == 1  # the waiting callers share one call for the info
            engine.load.set_result(INFO)
            await asyncio.wait_for(watch, 5)
            token_channel.replicas_changed(["replica-1"])  # Serve routes to the first one
            await asyncio.sleep(0.05)
            r = await http.get("/health")
            assert r.status_code == 503 and "1 of 2" in r.json()["error"]["message"]
            token_channel.replicas_changed(["replica-1", "replica-2"])
            await asyncio.sleep(0.05)
            r = await http.get("/health")
            assert r.status_code == 200 and r.json() == {"status": "ok", "replicas": 2}
            token_channel.replicas_changed(["replica-2"])  # one died: not ready again
            await asyncio.sleep(0.05)
            assert (await http.get("/health")).status_code == 503
        client.channels.close()

    asyncio.run(main())


def test_the_engine_core_is_ready_only_after_its_warm_up():
    from optgptq.config import EngineConfig
    from optgptq.engine.async_engine import AsyncLLMEngine

    config = EngineConfig.from_dict({"model": "smollm2", "device": "cpu", "num_blocks": 16})
    engine = AsyncLLMEngine(config, core="synthetic", process=True)
    try:
        startup = engine.model_info()["startup"]
        assert startup["warmup_s"] > 0 and startup["process_s"] >= startup["warmup_s"]
    finally:
        engine.shutdown()
