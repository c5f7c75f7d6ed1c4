"""The router actor: one Serve deployment gathering the prefix index of all engine replicas.

Engine replicas push their block-pool cache events and engine stats here
(:meth:`PrefixIndexService.update`, every 0.1-2 s). Every router (one per process holding a
handle to the engine deployment) keeps its own copy of the index and ranks replicas locally;
:meth:`watch` feeds that copy: a snapshot of every replica's blocks, then each update's events
as they arrive, and the removal of replicas that stopped publishing. Being a Serve deployment,
it lives and dies with the application (no detached global actor). If it restarts, its index
starts empty; each replica's next update learns so and sends a snapshot of its blocks, so the
index is whole again within one publish period. Routers keep their copies meanwhile (routing
never waits for this actor) and reconnect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from ray import serve

from optgptq.serving.router_index import PrefixIndex, RouterParams

INDEX_DEPLOYMENT = "PrefixIndex"
STALE_S = 10.0
"""Replicas publish at least every 2 s; one silent for this long is gone."""


@serve.deployment(name=INDEX_DEPLOYMENT, num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0},
                  logging_config={"enable_access_log": False})  # updates arrive every 0.1-2 s
class PrefixIndexService:
    def __init__(self, params: dict) -> None:
        self.index = PrefixIndex(RouterParams(**params))
        self.stats: dict[str, tuple[float, dict]] = {}
        self._watchers: list[list] = []       # per watch stream: messages not yet sent
        self._wake = asyncio.Event()

    def update(self, replica: str, events: list[tuple[str, int]], stats: dict,
               snapshot: list[int] | None = None) -> bool:
        """A replica's cache events since its last update, and its current engine stats; with
        ``snapshot``, every block hash it holds, replacing what the index had. Returns False
        when the index knows nothing of the replica (new, restarted, or the replica was pruned):
        the replica then sends a snapshot, so that a restarted index rebuilds at once."""
        if snapshot is not None:
            self.index.remove_replica(replica)
            self.index.apply_events(replica, [("add", h) for h in snapshot])
            self._send(("snapshot", replica, sorted(snapshot)))
        elif replica not in self.stats:
            self.stats[replica] = (time.monotonic(), stats)
            return False
        self.index.apply_events(replica, events)
        self.stats[replica] = (time.monotonic(), stats)
        if events:
            self._send(("events", replica, events))
        self._prune()
        return True

    def _prune(self) -> None:
        now = time.monotonic()
        for replica in [r for r, (t, _) in self.stats.items() if now - t > STALE_S]:
            del self.stats[replica]
            self.index.remove_replica(replica)
            self._send(("removed", replica, None))

    def _send(self, message: tuple) -> None:
        for queue in self._watchers:
            queue.append(message)
        self._wake.set()

    async def watch(self) -> AsyncIterator[tuple]:
        """``("snapshot", replica, hashes)`` per replica, then ``("events", replica, events)``
        and ``("removed", replica, None)`` as they happen."""
        queue = [("snapshot", r, sorted(self.index.held(r))) for r in self.index.replicas]
        self._watchers.append(queue)
        try:
            while True:
                while queue:
                    yield queue.pop(0)
                self._wake.clear()
                await self._wake.wait()
        finally:
            self._watchers.remove(queue)

    def replica_stats(self) -> dict[str, dict]:
        """Latest engine stats per live replica, plus the blocks the index believes it holds."""
        self._prune()
        return {r: {**s, "indexed_blocks": self.index.num_blocks(r)}
                for r, (t, s) in self.stats.items()}
