"""Ray Serve request router for the engine deployment: prefix-aware (default), pow2, round-robin.

Serve builds one router per process that holds a handle to the engine deployment (here: the
ingress replicas) and calls :meth:`OptGPTQRouter.choose_replicas` for every request; the ranks it
returns are tried in order, each probed for capacity (Serve's rejection protocol), so a full
replica is passed over. Policies (``request_router_kwargs``):

- ``prefix_aware``: the algorithm of :mod:`optgptq.serving.router_index`, evaluated by the router
  actor (:mod:`deployments.prefix_index`) that holds the index fed by the replicas' cache events.
  Load per replica is this router's in-flight count (exact for its own traffic) or the replica's
  reported waiting + running (Serve routing stats, every ``request_routing_stats_period_s``),
  whichever is larger. If the router actor does not answer within ``index_timeout_s`` the
  request is ranked by load alone (ties at random) rather than delayed.
- ``pow2``: two random replicas, the less loaded wins (Serve's default policy).
- ``round_robin``: replicas in turn, by id.

Replicas that are removed or die leave the index (``update_replicas``,
``on_replica_actor_died``); new replicas start with an empty entry and fill from their events.
Parameters: ``policy``, ``block_size`` (the engine's), ``index_timeout_s``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random

from ray import serve
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from deployments.prefix_index import INDEX_DEPLOYMENT
from optgptq.serving.protocol import EngineRequest
from optgptq.serving.router_index import prompt_block_hashes

log = logging.getLogger("ray.serve")
POLICIES = ("prefix_aware", "pow2", "round_robin")


class OptGPTQRouter(RequestRouter):
    def initialize_state(self, policy: str = "prefix_aware", block_size: int = 16,
                         index_timeout_s: float = 0.5) -> None:
        if policy not in POLICIES:
            raise ValueError(f"router policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.block_size = block_size
        self.index_timeout_s = index_timeout_s
        self._index = None
        self._turn = itertools.count()
        self._known: set[str] = set()
        self._in_flight: dict[str, int] = {}
        self._routed: dict[str, str] = {}  # internal request id -> replica id

    # -- choosing ---------------------------------------------------------------------------
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:  # every rank is offered; back off before a retry
            pending_request.routing_context.should_backoff = True
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if self.policy == "pow2":
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        if self.policy == "round_robin":
            ids = sorted(by_id)
            first = next(self._turn) % len(ids)
            return [[by_id[i]] for i in ids[first:] + ids[:first]]
        loads = {i: self._load(r) for i, r in by_id.items()}
        request = _engine_request(pending_request)
        ranked = None
        if request is not None:
            hashes = prompt_block_hashes(request.token_ids, self.block_size)
            try:
                index = await self._index_handle()
                ranked = await asyncio.wait_for(
                    index.route.remote(len(request.token_ids), hashes, loads),
                    self.index_timeout_s)
            except Exception as exc:  # the router actor is optional for correctness
                log.warning("prefix index unavailable (%s); ranking by load", exc)
        if ranked is None:
            ranked = sorted(loads, key=lambda i: (loads[i], random.random()))
        return [[by_id[i]] for i in ranked if i in by_id]

    def _load(self, replica: RunningReplica) -> int:
        stats = replica.routing_stats or {}
        reported = int(stats.get("waiting", 0)) + int(stats.get("running", 0))
        return max(self._in_flight.get(replica.replica_id.unique_id, 0), reported)

    async def _index_handle(self):
        # A handle's first use builds its router, which blocks on Serve's router event loop:
        # the loop this method runs on. Build it on a worker thread instead.
        if self._index is None:
            def build():
                return serve.get_deployment_handle(INDEX_DEPLOYMENT, self.app_name).options()

            self._index = await asyncio.get_running_loop().run_in_executor(None, build)
        return self._index

    # -- hooks --------------------------------------------------------------------------------
    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result) -> None:
        rid = replica_id.unique_id
        self._in_flight[rid] = self._in_flight.get(rid, 0) + 1
        self._routed[pending_request.metadata.internal_request_id] = rid

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        rid = self._routed.pop(internal_request_id, None)
        if rid is not None:
            self._in_flight[rid] = max(0, self._in_flight.get(rid, 0) - 1)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        live = {r.replica_id.unique_id for r in replicas}
        for rid in self._known - live:
            self._forget(rid)
        self._known = live
        super().update_replicas(replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id.unique_id)

    def _forget(self, rid: str) -> None:
        self._known.discard(rid)
        self._in_flight.pop(rid, None)
        if self.policy == "prefix_aware" and self._index is not None:
            self._index.remove_replica.remote(rid)


def _engine_request(pending_request: PendingRequest | None) -> EngineRequest | None:
    if pending_request is None:
        return None
    for arg in list(pending_request.args) + list(pending_request.kwargs.values()):
        if isinstance(arg, EngineRequest):
            return arg
    return None
