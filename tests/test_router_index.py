"""Prefix-aware routing logic with fake replicas and a fake clock (no Ray)."""

from __future__ import annotations

import random

import pytest

from optgptq.engine.block_pool import BlockPool
from optgptq.engine.sampling_params import SamplingParams
from optgptq.engine.sequence import Sequence
from optgptq.serving.router_index import PrefixIndex, RouterParams, prompt_block_hashes

BS = 16


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 49152) for _ in range(n)]


def _pool_events(token_ids: list[int], salt: str | None = None) -> list[tuple[str, int]]:
    """The events a replica's block pool logs after computing ``token_ids``."""
    pool = BlockPool(64, BS, record_events=True)
    seq = Sequence("r", token_ids, SamplingParams(cache_salt=salt), 0, 1)
    assert pool.allocate(seq, len(token_ids))
    seq.num_computed_tokens = len(token_ids)
    pool.cache_full_blocks(seq)
    return pool.drain_events()


@pytest.fixture
def rng():
    return random.Random()


def test_router_hashes_equal_the_engine_pool_hashes(rng):
    ids = _tokens(rng, rng.randrange(3 * BS + 1, 6 * BS))
    added = [h for kind, h in _pool_events(ids) if kind == "add"]
    router = prompt_block_hashes(ids, BS)
    assert router == added[:len(router)]
    assert len(router) == (len(ids) - 1) // BS  # the block with the last token is never reused


def test_salted_prompts_hash_in_their_own_namespace(rng):
    ids = _tokens(rng, 4 * BS + 1)
    salt = f"tenant-{rng.randrange(1000)}"
    added = [h for kind, h in _pool_events(ids, salt) if kind == "add"]
    router = prompt_block_hashes(ids, BS, salt)
    assert router == added[:len(router)]  # router and engine agree under a salt too
    others = [prompt_block_hashes(ids, BS), prompt_block_hashes(ids, BS, salt + "x")]
    assert all(set(router).isdisjoint(o) for o in others)  # no block shared across salts


def test_salted_blocks_are_reused_only_under_the_same_salt(rng):
    pool = BlockPool(64, BS)
    ids = _tokens(rng, 4 * BS + 3)
    first = Sequence("a", ids, SamplingParams(cache_salt="t1"), 0, 1)
    assert pool.allocate(first, len(ids))
    first.num_computed_tokens = len(ids)
    pool.cache_full_blocks(first)
    pool.free(first)
    for salt, hits in (("t2", 0), (None, 0), ("t1", 4)):
        seq = Sequence("b", ids, SamplingParams(cache_salt=salt), 1, 1)
        assert len(pool.find_prefix(seq)) == hits, salt


def test_repeated_shared_prefix_goes_to_its_holder(rng):
    index = PrefixIndex(RouterParams(block_size=BS), clock=Clock(), rng=rng)
    prefix = _tokens(rng, 8 * BS)
    index.apply_events("b", _pool_events(prefix + _tokens(rng, 5)))
    for _ in range(5):
        prompt = prefix + _tokens(rng, rng.randrange(1, 40))
        hashes = prompt_block_hashes(prompt, BS)
        assert index.matched_tokens(hashes, ["a", "b", "c"]) == {"a": 0, "b": 8 * BS, "c": 0}
        assert index.route(len(prompt), hashes, {"a": 0, "b": 0, "c": 0})[0] == "b"


def test_unrelated_prompts_spread_over_idle_replicas(rng):
    index = PrefixIndex(RouterParams(block_size=BS), clock=Clock(), rng=rng)
    index.apply_events("a", _pool_events(_tokens(rng, 4 * BS)))
    firsts = set()
    for _ in range(40):
        prompt = _tokens(rng, rng.randrange(2 * BS, 5 * BS))
        firsts.add(index.route(len(prompt), prompt_block_hashes(prompt, BS),
                               {"a": 0, "b": 0, "c": 0})[0])
    assert firsts == {"a", "b", "c"}


def test_claims_keep_concurrent_requests_together_until_they_expire(rng):
    clock = Clock()
    params = RouterParams(block_size=BS, load_token_cost=32, claim_ttl_s=5.0)
    index = PrefixIndex(params, clock=clock, rng=rng)
    prefix = _tokens(rng, 6 * BS)
    first = prefix + _tokens(rng, 3)
    chosen = index.route(len(first), prompt_block_hashes(first, BS), {"a": 0, "b": 0})[0]
    other = "b" if chosen == "a" else "a"
    second = prefix + _tokens(rng, 3)
    hashes = prompt_block_hashes(second, BS)
    # no cache event yet: the claim alone attracts the request, despite one more in flight
    assert index.route(len(second), hashes, {chosen: 1, other: 0})[0] == chosen
    clock.now += 6.0
    assert index.matched_tokens(hashes, [chosen]) == {chosen: 0}


def test_evictions_and_removed_replicas_leave_the_index(rng):
    index = PrefixIndex(RouterParams(block_size=BS), clock=Clock(), rng=rng)
    prompt = _tokens(rng, 5 * BS + 1)
    hashes = prompt_block_hashes(prompt, BS)
    index.apply_events("a", _pool_events(prompt))
    index.apply_events("b", _pool_events(prompt))
    index.apply_events("a", [("evict", hashes[2])])
    assert index.matched_tokens(hashes, ["a", "b"]) == {"a": 2 * BS, "b": 5 * BS}
    index.remove_replica("b")
    assert index.matched_tokens(hashes, ["a", "b"]) == {"a": 2 * BS, "b": 0}
    assert "b" not in index.replicas
    with pytest.raises(ValueError, match="kind"):
        index.apply_events("a", [("move", 1)])


def test_locality_is_traded_against_load_not_dropped(rng):
    params = RouterParams(block_size=BS, load_token_cost=64, balance_abs=8, balance_rel=2.0)
    index = PrefixIndex(params, clock=Clock(), rng=rng)
    prompt = _tokens(rng, 20 * BS + 1)  # 320 cached tokens are worth 5 queued requests
    hashes = prompt_block_hashes(prompt, BS)
    index.apply_events("hot", _pool_events(prompt))
    assert index.rank(len(prompt), hashes, {"hot": 3, "cold": 0})[0] == "hot"
    assert index.rank(len(prompt), hashes, {"hot": 6, "cold": 0})[0] == "cold"


def test_balance_guard_never_sends_everything_to_one_replica(rng):
    params = RouterParams(block_size=BS, load_token_cost=0, balance_abs=4, balance_rel=1.5)
    index = PrefixIndex(params, clock=Clock(), rng=rng)
    prompt = _tokens(rng, 30 * BS + 1)
    hashes = prompt_block_hashes(prompt, BS)
    index.apply_events("hot", _pool_events(prompt))
    loads = {"hot": 0, "cold": 0}
    for _ in range(40):  # load_token_cost 0: only the guard counters locality
        first = index.route(len(prompt), hashes, loads)[0]
        loads[first] += 1
    # the guard: a replica is passed over once it leads by more than balance_abs AND by more
    # than the factor balance_rel, so it never leads by more than one request past both
    hot, cold = loads["hot"], loads["cold"]
    assert hot <= max(cold + params.balance_abs, params.balance_rel * cold) + 1
    assert cold > 0


@pytest.mark.parametrize("bad", [{"block_size": 0}, {"load_token_cost": -1},
                                 {"balance_abs": -1}, {"balance_rel": 0.5}, {"claim_ttl_s": 0}])
def test_bad_parameters_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RouterParams(**bad)
