"""The application config (validated once, errors name the field) and the KV-pressure policy."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("ray.serve")
from deployments.app import parse_config  # noqa: E402
from deployments.autoscaling import KVPressurePolicy  # noqa: E402

YAML = Path(__file__).resolve().parent.parent / "deployments" / "optgptq.yaml"


def test_shipped_yaml_is_valid_and_serves_on_loopback():
    doc = yaml.safe_load(YAML.read_text())
    assert doc["proxy_location"] == "Disabled"  # the ingress replicas serve both APIs
    (app,) = doc["applications"]
    config = parse_config(app["args"])
    assert (config.ingress.host, config.ingress.http_port, config.ingress.grpc_port) == (
        "127.0.0.1", 8000, 9000)
    assert config.router.policy == "prefix_aware"
    assert config.replicas.num_cpus < 1 and config.replicas.autoscaling_config["min_replicas"] == 2


def test_shipped_gpu_yaml_is_valid_one_replica_per_gpu():
    doc = yaml.safe_load(YAML.with_name("optgptq-gpu.yaml").read_text())
    assert doc["proxy_location"] == "Disabled"
    (app,) = doc["applications"]
    config = parse_config(app["args"])
    assert config.replicas.num_gpus == 1 and config.engine["device"] == "cuda"
    assert config.replicas.max_ongoing_requests >= config.engine["max_num_seqs"]


@pytest.mark.parametrize("args,field", [
    ({"engine": {"block_size": 0}}, "block_size"),
    ({"engine": {"blok_size": 16}}, "blok_size"),
    ({"engine": {"model": "smollm2"}}, "engine"),
    ({"router": {"policy": "fastest"}}, "router.policy"),
    ({"router": {"balance_rel": 0.5}}, "router.balance_rel"),
    ({"replicas": {"num_replicas": 0}}, "replicas.num_replicas"),
    ({"replicas": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 2}}}, "replicas"),
    ({"replicas": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}},
     "replicas.autoscaling_config"),
    ({"ingress": {"max_request_bytes": 10}}, "ingress.max_request_bytes"),
    ({"model": "/no/such/model"}, "model"),
    ({"served_as": "x"}, "served_as"),
])
def test_bad_config_names_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        parse_config(args)


def _ctx(current: int, requests: float, kv: list[float], waiting: list[float]):
    ids = [f"r{i}" for i in range(current)]
    return SimpleNamespace(
        current_num_replicas=current, target_num_replicas=current, total_num_requests=requests,
        config=SimpleNamespace(get_target_ongoing_requests=lambda: 8.0),
        aggregated_metrics={"kv_used_fraction": dict(zip(ids, kv)),
                            "waiting": dict(zip(ids, waiting))})


def test_policy_scales_on_the_largest_demand():
    policy = KVPressurePolicy(kv_target=0.5, queue_target=2)
    n = random.randint(2, 5)
    quiet, _ = policy(_ctx(n, requests=8.0 * n, kv=[0.25] * n, waiting=[0.0] * n))
    assert quiet == pytest.approx(n)  # requests at target, KV and queue below
    kv_bound, state = policy(_ctx(n, requests=1.0, kv=[1.0] * n, waiting=[0.0] * n))
    assert kv_bound == pytest.approx(2 * n) and state["demand"]["kv"] == pytest.approx(2 * n)
    queued, _ = policy(_ctx(n, requests=1.0, kv=[0.1] * n, waiting=[6.0] * n))
    assert queued == pytest.approx(3 * n)
    idle, _ = policy(_ctx(n, requests=0.0, kv=[0.0] * n, waiting=[0.0] * n))
    assert idle == 0  # Serve clamps to min_replicas after the downscale delay


def test_policy_rejects_bad_targets():
    with pytest.raises(ValueError, match="kv_target"):
        KVPressurePolicy(kv_target=1.5)
    with pytest.raises(ValueError, match="queue_target"):
        KVPressurePolicy(queue_target=0)
