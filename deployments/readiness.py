"""Readiness of an ingress: ``/health`` is 200 only once every engine replica can answer.

An engine replica can answer once it is constructed: its engine loaded and warmed up (the engine
core answers ``ready`` only after a warm-up request, :func:`optgptq.engine.core_process.warm_up`),
which is when Serve starts routing to it. The ingress learns which replicas Serve routes to from
the router of its own process (``update_replicas``, pushed by Serve's long poll, through
:func:`deployments.token_channel.replicas_changed` into the engine client's
``channels.replicas``), so answering ``/health`` costs no remote call. Ready means: the model's
info is known (the first replica answered) and at least ``expected`` replicas are routable
(the engine deployment's ``num_replicas``, or with autoscaling its ``min_replicas``, at least
one).

A request that arrives before any replica can answer waits at most the ingress's
``admission_timeout_s`` (:meth:`deployments.engine_client.EngineClient.model_info`), then gets
503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import logging

from optgptq.serving.protocol import APIError

log = logging.getLogger("ray.serve")
RETRY_S = 0.5
"""How often the watch asks again for the model's info while no replica answers."""


class Readiness:
    """Whether an ingress's engine client can serve; ``watch`` runs once in the background."""

    def __init__(self, client, expected: int) -> None:
        if expected < 1:
            raise ValueError(f"expected replicas must be at least 1, got {expected}")
        self.client = client
        self.expected = expected
        self.answered = False

    async def watch(self) -> None:
        """Wait until an engine replica gives the model's info (cached by the client)."""
        while not self.answered:
            try:
                await self.client.model_info()
                self.answered = True
            except APIError:
                await asyncio.sleep(RETRY_S)

    @property
    def routable(self) -> int:
        """Engine replicas the router of this process routes to."""
        return len(self.client.channels.replicas)

    @property
    def ready(self) -> bool:
        return self.answered and self.routable >= self.expected

    def why_not(self) -> str:
        """What ``/health`` says while not ready."""
        if not self.answered:
            return "no engine replica has finished loading yet"
        return f"{self.routable} of {self.expected} engine replicas are ready"
