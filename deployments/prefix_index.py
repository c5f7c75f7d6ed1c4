"""The router actor: one Serve deployment holding the shared prefix index of all engine replicas.

Engine replicas push their block-pool cache events and engine stats here
(:meth:`PrefixIndexService.update`); every router (one per process holding a handle to the
engine deployment) asks it to rank replicas for a request (:meth:`route`), which also claims the
request's blocks for the first choice. Being a Serve deployment, it lives and dies with the
application (no detached global actor). If it restarts, the index starts empty and refills from
new cache events; meanwhile routers fall back to load-only ranking.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ray import serve

from optgptq.serving.router_index import PrefixIndex, RouterParams

INDEX_DEPLOYMENT = "PrefixIndex"
STALE_S = 10.0
"""Replicas publish at least every 2 s; stats older than this belong to a gone replica."""


@serve.deployment(name=INDEX_DEPLOYMENT, num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0},
                  logging_config={"enable_access_log": False})  # updates arrive every 0.1-2 s
class PrefixIndexService:
    def __init__(self, params: dict) -> None:
        self.index = PrefixIndex(RouterParams(**params))
        self.stats: dict[str, tuple[float, dict]] = {}

    def update(self, replica: str, events: list[tuple[str, int]], stats: dict) -> None:
        """A replica's cache events since its last update, and its current engine stats."""
        self.index.apply_events(replica, events)
        self.stats[replica] = (time.monotonic(), stats)

    def route(self, prompt_tokens: int, hashes: Sequence[int], loads: dict[str, int]) -> list[str]:
        """Replica ids best first (see optgptq.serving.router_index), claiming for the first."""
        return self.index.route(prompt_tokens, hashes, loads)

    def claim(self, replica: str, hashes: Sequence[int]) -> None:
        self.index.claim(replica, hashes)

    def remove_replica(self, replica: str) -> None:
        self.index.remove_replica(replica)
        self.stats.pop(replica, None)

    def replica_stats(self) -> dict[str, dict]:
        """Latest engine stats per live replica, plus the blocks the index believes it holds."""
        now = time.monotonic()
        return {r: {**s, "indexed_blocks": self.index.num_blocks(r)}
                for r, (t, s) in self.stats.items() if now - t < STALE_S}
