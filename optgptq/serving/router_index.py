"""Prefix-aware placement: which replica holds which prompt blocks, and how to rank replicas.

Pure Python (no Ray, no torch), so the algorithm is unit-tested with fake replicas and a fake
clock; ``deployments/router.py`` and ``deployments/prefix_index.py`` wire it into Ray Serve.

Algorithm
---------
1. **Prompt blocks.** A prompt of ``n`` tokens is cut into its ``(n - 1) // block_size`` leading
   full blocks (the engine never reuses the block holding the last prompt token, which must be
   computed for the first logits), each named by the engine's own chained hash
   (:func:`optgptq.engine.block_pool.hash_block`), so equal hashes mean equal whole prefixes.
2. **Index.** Per replica, the set of block hashes its KV pool holds, kept current from the
   pool's own ``("add" | "evict", hash)`` events (blocks are registered only after their KV is
   computed). Because that lags the routing decision by a prefill, the router also records an
   optimistic *claim* for the replica it picks: the request's block hashes, held for
   ``claim_ttl_s`` seconds unless an ``add`` confirms or an ``evict`` drops them. Concurrent
   requests sharing a new prefix therefore follow the first one instead of scattering.
3. **Match.** For each candidate, ``matched(r)`` is the number of leading prompt blocks (times
   ``block_size``) that ``r`` holds or claims, stopping at the first miss (prefix reuse is
   all-or-nothing past a gap).
4. **Load.** ``load(r)`` counts requests on the replica (router-side in-flight count, or the
   replica's reported waiting + running when that is larger).
5. **Balance guard** (two conditions, after SGLang's router): a replica is *overloaded* when
   ``load(r) - min_load > balance_abs`` **and** ``load(r) > balance_rel * min_load``. Overloaded
   replicas are ranked last, whatever they hold, so one replica can never take all traffic.
6. **Cost.** Every other replica costs the prefill it would do plus its queue expressed in
   tokens: ``cost(r) = (prompt_tokens - matched(r)) + load_token_cost * load(r)``. The cheapest
   comes first; ties (e.g. unrelated prompts on equally idle replicas) are broken at random, so
   traffic without shared prefixes spreads like least-loaded routing, and a shared prefix stays
   on its holder until its queue outweighs the prefill it saves (locality is traded against
   load, never dropped wholesale).

Parameters (:class:`RouterParams`): ``block_size`` (must equal the engine's), ``load_token_cost``
(tokens of prefill one queued request is worth; larger favours balance, smaller locality),
``balance_abs`` and ``balance_rel`` (the guard above), ``claim_ttl_s`` (lifetime of an
unconfirmed claim).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from optgptq.engine.block_pool import hash_block, root_hash


@dataclass(frozen=True)
class RouterParams:
    """Tunables of the prefix-aware policy; see the module docstring for their roles."""

    block_size: int = 16
    load_token_cost: float = 256.0
    balance_abs: int = 4
    balance_rel: float = 1.5
    claim_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.load_token_cost < 0:
            raise ValueError(f"load_token_cost must be >= 0, got {self.load_token_cost!r}")
        if self.balance_abs < 0:
            raise ValueError(f"balance_abs must be >= 0, got {self.balance_abs!r}")
        if self.balance_rel < 1:
            raise ValueError(f"balance_rel must be >= 1, got {self.balance_rel!r}")
        if self.claim_ttl_s <= 0:
            raise ValueError(f"claim_ttl_s must be > 0, got {self.claim_ttl_s!r}")


def prompt_block_hashes(token_ids: Sequence[int], block_size: int,
                        cache_salt: str | None = None) -> list[int]:
    """Chained hashes of the prompt's reusable leading full blocks (step 1), in the namespace
    of ``cache_salt`` as the engine hashes them."""
    hashes: list[int] = []
    parent = root_hash(cache_salt)
    for i in range((len(token_ids) - 1) // block_size):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes


class PrefixIndex:
    """Block hashes held (confirmed by cache events) or claimed (recently routed) per replica."""

    def __init__(self, params: RouterParams, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.params = params
        self._clock = clock
        self._rng = rng or random.Random()
        self._held: dict[str, set[int]] = {}
        self._claims: dict[str, dict[int, float]] = {}  # replica -> hash -> expiry

    @property
    def replicas(self) -> list[str]:
        return sorted(set(self._held) | set(self._claims))

    def num_blocks(self, replica: str) -> int:
        """Confirmed blocks the index believes ``replica`` holds."""
        return len(self._held.get(replica, ()))

    def held(self, replica: str) -> set[int]:
        """The block hashes ``replica`` holds (confirmed by its events)."""
        return set(self._held.get(replica, ()))

    def apply_events(self, replica: str, events: Iterable[tuple[str, int]]) -> None:
        """Replay a replica's block-pool events, in order."""
        held = self._held.setdefault(replica, set())
        claims = self._claims.get(replica, {})
        for kind, block_hash in events:
            if kind == "add":
                held.add(block_hash)
            elif kind == "evict":
                held.discard(block_hash)
            else:
                raise ValueError(f"unknown cache event kind {kind!r}")
            claims.pop(block_hash, None)

    def claim(self, replica: str, hashes: Sequence[int]) -> None:
        """Record that ``replica`` is about to compute ``hashes`` (expires after the TTL)."""
        now = self._clock()
        claims = self._claims.setdefault(replica, {})
        for h in [h for h, expiry in claims.items() if expiry <= now]:
            del claims[h]
        held = self._held.get(replica, ())
        expiry = now + self.params.claim_ttl_s
        for h in hashes:
            if h not in held:
                claims[h] = expiry

    def remove_replica(self, replica: str) -> None:
        """Forget a replica that was removed or died."""
        self._held.pop(replica, None)
        self._claims.pop(replica, None)

    def matched_tokens(self, hashes: Sequence[int], replicas: Iterable[str]) -> dict[str, int]:
        """Leading prompt tokens each replica holds or claims (step 3)."""
        now = self._clock()
        out = {}
        for r in replicas:
            held, claims = self._held.get(r, set()), self._claims.get(r, {})
            n = 0
            for h in hashes:
                if h not in held and claims.get(h, 0.0) <= now:
                    break
                n += 1
            out[r] = n * self.params.block_size
        return out

    def rank(self, prompt_tokens: int, hashes: Sequence[int],
             loads: dict[str, int]) -> list[str]:
        """Candidates (the keys of ``loads``) best first, by steps 3-6."""
        if not loads:
            return []
        p = self.params
        matched = self.matched_tokens(hashes, loads)
        min_load = min(loads.values())

        def overloaded(r: str) -> bool:
            return loads[r] - min_load > p.balance_abs and loads[r] > p.balance_rel * min_load

        def key(r: str) -> tuple[bool, float, float]:
            cost = (prompt_tokens - matched[r]) + p.load_token_cost * loads[r]
            return overloaded(r), cost, self._rng.random()

        return sorted(loads, key=key)

    def route(self, prompt_tokens: int, hashes: Sequence[int],
              loads: dict[str, int]) -> list[str]:
        """:meth:`rank`, then claim the request's blocks for the first choice."""
        ranked = self.rank(prompt_tokens, hashes, loads)
        if ranked and hashes:
            self.claim(ranked[0], hashes)
        return ranked
