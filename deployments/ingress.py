"""Ingress: the OpenAI-compatible HTTP API and the gRPC service, served by the ingress replicas.

Each ingress replica runs its own servers in its own event loop: uvicorn with the FastAPI app of
:mod:`deployments.http_api` on ``host:http_port`` and a ``grpc.aio`` server with
:mod:`deployments.grpc_api` on ``host:grpc_port``, both with ``SO_REUSEPORT`` so that the ingress
replicas of a host share the ports and the kernel spreads connections among them. Serve's own
proxies are off (``proxy_location: Disabled``): a token then crosses one process boundary between
the engine replica and the client's socket instead of two, and the per-token work of the proxy
(measured as the serving path's largest cost, bench/results/serve-overhead-*.json) is gone. Serve
still owns the ingress replicas' lifecycle (placement, health checks, restarts, scaling).

Both APIs check the caller's API key (:mod:`deployments.auth`), validate and tokenize here (a
large body is parsed and tokenized on a worker thread, so that it never stalls the other
requests of the loop), then send an :class:`~optgptq.serving.protocol.EngineRequest` through the
engine deployment's handle, whose router (:mod:`deployments.router`) picks the replica
(:mod:`deployments.engine_client`). Both servers refuse a request larger than
``max_request_bytes`` before decoding it. ``/health`` answers 503 until every engine replica can
answer (:mod:`deployments.readiness`), then 200.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

import grpc
import uvicorn
from transformers import AutoTokenizer

from deployments.auth import APIKeys
from deployments.engine_client import EngineClient
from deployments.grpc_api import GRPCService, grpc_handlers
from deployments.http_api import build_http_app
from deployments.readiness import Readiness
from deployments.serve_calls import background
from optgptq.serving.metrics import ServingMetrics

if TYPE_CHECKING:
    from deployments.app import IngressConfig

log = logging.getLogger("ray.serve")
STATS_TIMEOUT_S = 0.5


class Ingress:
    def __init__(self, engine, index, model_name: str, model_path: str,
                 config: IngressConfig, keys: dict[str, str], expected_replicas: int = 1) -> None:
        """``config``: the YAML's ``ingress`` settings (without keys); ``keys``: API key
        digest -> tenant (:func:`deployments.auth.collect_keys`); ``expected_replicas``: the
        engine replicas that must be routable before ``/health`` says ready."""
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.metrics = ServingMetrics()
        self.client = EngineClient(engine, tokenizer, self.metrics, config.admission_timeout_s)
        self.index = index
        self.model_name = model_name
        self.config = config
        self.keys = APIKeys(keys)
        self.max_request_bytes = config.max_request_bytes
        self.readiness = Readiness(self.client, expected_replicas)
        self._replica_stats: dict[str, dict] = {}
        host = config.host
        self._http = uvicorn.Server(uvicorn.Config(
            build_http_app(self), log_level="warning", access_log=False, lifespan="off",
            timeout_keep_alive=30, h11_max_incomplete_event_size=config.max_request_bytes))
        self._http_task = background(self._http.serve(
            sockets=[_listen(host, config.http_port)]))
        self._grpc = grpc.aio.server(options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_send_message_length", 64 << 20)])
        self._grpc.add_generic_rpc_handlers((grpc_handlers(GRPCService(self)),))
        if self._grpc.add_insecure_port(f"{_grpc_host(host)}:{config.grpc_port}") == 0:
            raise RuntimeError(f"ingress: cannot listen for gRPC on {host}:{config.grpc_port}")
        self._grpc_task = background(self._grpc.start())
        self._ready_task = background(self.readiness.watch())

    async def replica_stats(self) -> dict[str, dict]:
        """The router actor's per-replica stats, or the last ones it gave when it does not
        answer within STATS_TIMEOUT_S (restarting: /metrics must not wait for it)."""
        try:
            self._replica_stats = await asyncio.wait_for(
                self.index.replica_stats.remote(), STATS_TIMEOUT_S)
        except Exception as exc:  # gone or slow: serve what is known
            log.warning("router actor did not give replica stats: %r", exc)
        return self._replica_stats

    async def check_health(self) -> None:
        """Serve's health check: both servers must still be serving."""
        for task in (self._http_task, self._grpc_task):
            if task.done() and task.exception() is not None:
                raise RuntimeError(f"ingress server failed: {task.exception()!r}")
        if self._http_task.done():
            raise RuntimeError("ingress HTTP server stopped")

    async def __del__(self) -> None:
        self._http.should_exit = True
        await self._grpc.stop(grace=5)
        self._ready_task.cancel()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket shared with the host's other ingress replicas (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"ingress: cannot listen for HTTP on {host}:{port}: {exc}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _grpc_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
