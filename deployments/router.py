"""Ray Serve request router for the engine deployment: prefix-aware (default), pow2, round-robin.

Serve builds one router per process that holds a handle to the engine deployment (here: the
ingress replicas) and calls :meth:`OptGPTQRouter.choose_replicas` for every request; the ranks it
returns are tried in order, each probed for capacity (Serve's rejection protocol), so a full
replica is passed over. Policies (``request_router_kwargs``):

- ``prefix_aware``: the algorithm of :mod:`optgptq.serving.router_index`, evaluated here, in the
  router's own process, on its own copy of the index: no remote call on a request's path. The
  copy follows the router actor (:mod:`deployments.prefix_index`), which gathers the replicas'
  cache events, through one stream (:meth:`PrefixIndexService.watch`: a snapshot, then the
  events as they come); claims for the replicas this router picks are its own. Load per
  replica is this router's in-flight count (exact for its own traffic) or the replica's reported
  waiting + running (Serve routing stats, every ``request_routing_stats_period_s``), whichever
  is larger. Until the stream's first snapshot (or while it reconnects) the copy is what it was:
  empty at first, so requests rank by load alone.
- ``pow2``: two random replicas, the less loaded wins (Serve's default policy).
- ``round_robin``: replicas in turn, by id.

A token channel (:class:`~optgptq.serving.protocol.Subscription`, deployments/token_channel.py)
goes to the replica it names, whatever the policy, and counts as no load; the ingresses of this
process learn the live replicas from here, to keep a channel from each.

Replicas that are removed or die leave the index (``update_replicas``,
``on_replica_actor_died``); new replicas start with an empty entry and fill from their events.
Parameters: ``policy`` and the :class:`~optgptq.serving.router_index.RouterParams` fields
(``block_size``, the engine's, ``load_token_cost``, ``balance_abs``, ``balance_rel``,
``claim_ttl_s``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time

from ray import serve
from ray.serve._private.constants import RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from deployments import token_channel
from deployments.prefix_index import INDEX_DEPLOYMENT
from deployments.serve_calls import TRANSPORT, background
from optgptq.serving.protocol import EngineRequest, Subscription
from optgptq.serving.router_index import PrefixIndex, RouterParams, prompt_block_hashes

log = logging.getLogger("ray.serve")
POLICIES = ("prefix_aware", "pow2", "round_robin")


class OptGPTQRouter(RequestRouter):
    def initialize_state(self, policy: str = "prefix_aware", **params) -> None:
        if policy not in POLICIES:
            raise ValueError(f"router policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.index = PrefixIndex(RouterParams(**params))
        self._follow: asyncio.Task | None = None
        self._turn = itertools.count()
        self._known: set[str] = set()
        self._in_flight: dict[str, int] = {}
        self._routed: dict[str, str] = {}  # internal request id -> replica id
        self._done_early: dict[str, float] = {}  # completed before routed -> when

    # -- choosing ---------------------------------------------------------------------------
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:  # every rank is offered; back off before a retry
            pending_request.routing_context.should_backoff = True
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        channel = _arg(pending_request, Subscription)
        if channel is not None:  # a token channel goes to its replica (gone: any, which refuses)
            return [[by_id.get(channel.replica, candidate_replicas[0])]]
        if self.policy == "pow2":
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        if self.policy == "round_robin":
            ids = sorted(by_id)
            first = next(self._turn) % len(ids)
            return [[by_id[i]] for i in ids[first:] + ids[:first]]
        loads = {i: self._load(r) for i, r in by_id.items()}
        request = _arg(pending_request, EngineRequest)
        if request is None:
            ranked = sorted(loads, key=lambda i: (loads[i], random.random()))
        else:
            if self._follow is None:  # a process that sends requests: follow the index
                self._follow = background(self._follow_index())
            hashes = prompt_block_hashes(request.token_ids, self.index.params.block_size,
                                         request.params.cache_salt)
            ranked = self.index.route(len(request.token_ids), hashes, loads)
        return [[by_id[i]] for i in ranked]

    def _load(self, replica: RunningReplica) -> int:
        stats = replica.routing_stats or {}
        reported = int(stats.get("waiting", 0)) + int(stats.get("running", 0))
        return max(self._in_flight.get(replica.replica_id.unique_id, 0), reported)

    async def _follow_index(self) -> None:
        """Keep this router's index a copy of the router actor's (snapshot, then events)."""
        backoff = 0.1
        while True:
            try:
                handle = await self._index_handle()
                async for kind, replica, payload in handle.watch.remote():
                    backoff = 0.1
                    if kind == "snapshot":
                        self.index.remove_replica(replica)
                        self.index.apply_events(replica, [("add", h) for h in payload])
                    elif kind == "events":
                        self.index.apply_events(replica, payload)
                    elif replica not in self._known:  # "removed", and not back since
                        self.index.remove_replica(replica)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the router actor restarting: keep the copy, retry
                log.warning("prefix index stream broke (%s); reconnecting", exc)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, 5.0)

    async def _index_handle(self):
        def build():
            return serve.get_deployment_handle(INDEX_DEPLOYMENT, self.app_name).options(
                stream=True, **TRANSPORT)

        if not RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP:  # the ingresses: one loop per process
            return build()
        # A handle's first use builds its router, which waits for Serve's router loop: the loop
        # this runs on where routers have a loop of their own (the default). Build it beside.
        return await asyncio.get_running_loop().run_in_executor(None, build)

    # -- hooks --------------------------------------------------------------------------------
    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result) -> None:
        if _arg(pending_request, Subscription) is not None:
            return  # a channel is no load
        request_id = pending_request.metadata.internal_request_id
        if self._done_early.pop(request_id, None) is not None:
            return  # a short call can complete before Serve reports it routed
        rid = replica_id.unique_id
        self._in_flight[rid] = self._in_flight.get(rid, 0) + 1
        self._routed[request_id] = rid

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        rid = self._routed.pop(internal_request_id, None)
        if rid is not None:
            self._in_flight[rid] = max(0, self._in_flight.get(rid, 0) - 1)
            return
        now = time.monotonic()
        self._done_early[internal_request_id] = now
        while len(self._done_early) > 1000 or next(iter(self._done_early.values())) < now - 60:
            self._done_early.pop(next(iter(self._done_early)))

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        live = {r.replica_id.unique_id for r in replicas}
        for rid in self._known - live:
            self._forget(rid)
        self._known = live
        token_channel.replicas_changed(live)
        super().update_replicas(replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id.unique_id)
        token_channel.replicas_changed(self._known)

    def _forget(self, rid: str) -> None:
        self._known.discard(rid)
        self._in_flight.pop(rid, None)
        self.index.remove_replica(rid)


def _arg(pending_request: PendingRequest | None, kind: type):
    """The request's argument of type ``kind`` (EngineRequest, Subscription), if any."""
    if pending_request is None:
        return None
    for arg in list(pending_request.args) + list(pending_request.kwargs.values()):
        if isinstance(arg, kind):
            return arg
    return None
