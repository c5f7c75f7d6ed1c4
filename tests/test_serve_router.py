"""The Serve RequestRouter subclass with fake replicas and an in-process index (Ray not started)."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID  # noqa: E402

from deployments.router import OptGPTQRouter  # noqa: E402
from optgptq.engine.sampling_params import SamplingParams  # noqa: E402
from optgptq.serving.protocol import EngineRequest, Subscription  # noqa: E402
from optgptq.serving.router_index import prompt_block_hashes  # noqa: E402

BS = 16
DEPLOYMENT = DeploymentID(name="EngineReplica", app_name="app")


def _replica(name: str, stats: dict | None = None):
    return SimpleNamespace(replica_id=ReplicaID(unique_id=name, deployment_id=DEPLOYMENT),
                           routing_stats=stats or {})


def _router(policy: str, **params) -> OptGPTQRouter:
    router = OptGPTQRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(policy=policy, block_size=BS, **params)
    router._follow = asyncio.Future  # no router actor here: the index is fed by the test
    return router


def _pending(token_ids: list[int], internal_id: str, arg=None):
    return SimpleNamespace(args=[arg or EngineRequest(internal_id, token_ids, SamplingParams())],
                           kwargs={}, metadata=SimpleNamespace(internal_request_id=internal_id),
                           routing_context=SimpleNamespace(should_backoff=False))


def _first(ranks) -> str:
    return ranks[0][0].replica_id.unique_id


def test_round_robin_takes_replicas_in_turn():
    router = _router("round_robin")
    replicas = [_replica(n) for n in random.sample(["a", "b", "c"], 3)]
    firsts = [_first(asyncio.run(router.choose_replicas(replicas, None))) for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]


def test_pow2_offers_two_distinct_replicas():
    router = _router("pow2")
    ranks = asyncio.run(router.choose_replicas([_replica(n) for n in "abcd"], None))
    assert len(ranks) == 1 and len({r.replica_id.unique_id for r in ranks[0]}) == 2


def test_prefix_aware_follows_the_index_and_counts_in_flight_load():
    rng = random.Random()
    router = _router("prefix_aware", load_token_cost=64, balance_abs=2)
    index = router.index
    replicas = [_replica("a"), _replica("b")]
    prefix = [rng.randrange(100, 49152) for _ in range(12 * BS)]
    index.apply_events("b", [("add", h) for h in prompt_block_hashes(prefix + [1], BS)])
    chosen = []
    for i in range(8):  # requests stay in flight: load builds up on the holder
        pending = _pending(prefix + [rng.randrange(100, 49152)], f"req-{i}")
        replica = asyncio.run(router.choose_replicas(replicas, pending))[0][0]
        router.on_request_routed(pending, replica.replica_id, None)
        chosen.append(replica.replica_id.unique_id)
    assert chosen[:3] == ["b", "b", "b"]  # 192 cached tokens outweigh two queued requests
    assert "a" in chosen  # but not every request piles onto the holder
    for i in range(8):
        router.on_request_completed(_replica(chosen[i]).replica_id, f"req-{i}")
    assert router._in_flight == {"a": 0, "b": 0}


def test_reported_engine_queue_counts_as_load():
    router = _router("prefix_aware")
    replicas = [_replica("a", {"waiting": 9, "running": 3}), _replica("b", {"running": 1})]
    pending = _pending([random.randrange(100, 49152) for _ in range(40)], "r")
    assert _first(asyncio.run(router.choose_replicas(replicas, pending))) == "b"
    assert pending.routing_context.should_backoff


def test_a_call_completed_before_it_is_reported_routed_leaves_no_load():
    router = _router("prefix_aware")
    a = _replica("a")
    router.on_request_completed(a.replica_id, "quick")  # Serve's order for a short call
    router.on_request_routed(_pending([1, 2], "quick"), a.replica_id, None)
    assert router._in_flight.get("a", 0) == 0


def test_token_channels_go_to_their_replica_and_are_no_load():
    router = _router("prefix_aware")
    replicas = [_replica(n) for n in "abc"]
    target = random.choice("abc")
    channel = _pending([], "ch", Subscription("ingress-1", target))
    assert [[r.replica_id.unique_id for r in rank]
            for rank in asyncio.run(router.choose_replicas(replicas, channel))] == [[target]]
    router.on_request_routed(channel, _replica(target).replica_id, None)
    assert router._in_flight.get(target, 0) == 0
    gone = _pending([], "ch2", Subscription("ingress-1", "gone"))  # any replica, which refuses
    assert len(asyncio.run(router.choose_replicas(replicas, gone))[0]) == 1


def test_dead_replica_leaves_the_index():
    router = _router("prefix_aware")
    dead = _replica("dead")
    router.index.apply_events("dead", [("add", 7)])
    router.on_request_routed(_pending([1, 2], "x"), dead.replica_id, None)

    async def die():  # Serve calls the hook on its event loop
        router.on_replica_actor_died(dead.replica_id)

    asyncio.run(die())
    assert "dead" not in router._in_flight and "dead" not in router.index.replicas


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="policy"):
        _router("fastest")


def test_restarted_index_gets_snapshots_from_the_replicas():
    from deployments.prefix_index import PrefixIndexService

    service = PrefixIndexService.func_or_class({"block_size": BS})  # a fresh (restarted) actor
    watched = service._watchers.append([]) or service._watchers[-1]  # a router's stream
    held = [random.getrandbits(63) for _ in range(5)]
    # a replica that published to the previous actor: its plain update is not taken ...
    assert service.update("r1", [("add", held[-1])], {"running": 0}) is False
    assert service.index.num_blocks("r1") == 0
    # ... so it sends everything it holds, which the index and the routers' copies take whole
    assert service.update("r1", [], {"running": 0}, snapshot=held) is True
    assert service.index.held("r1") == set(held)
    assert watched[-1] == ("snapshot", "r1", sorted(held))
    assert service.update("r1", [("evict", held[0])], {"running": 1}) is True
    assert service.index.held("r1") == set(held[1:])
