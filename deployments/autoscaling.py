"""KV-pressure autoscaling policy for the engine deployment (``autoscaling_config.policy``).

Serve's default policy scales on ongoing requests per replica alone; an LLM replica can be
saturated by a few long requests that fill its KV cache, or sit behind a queue that its batch
cannot absorb. This policy takes the largest of three demands, each expressed as replicas:

- requests: ``total ongoing requests / target_ongoing_requests`` (Serve's default signal, less
  the ingresses' token channels, which Serve counts as ongoing calls);
- KV pressure: ``current * mean(kv_used_fraction) / kv_target`` -- the replicas that would keep
  mean KV-cache occupancy at ``kv_target``;
- queue: ``current * mean(waiting) / queue_target`` -- the replicas that would keep the mean
  number of requests waiting inside an engine (admitted by Serve, not yet scheduled for lack of
  blocks or batch room) at ``queue_target``.

The per-replica signals come from
:meth:`deployments.replica.EngineReplica.record_autoscaling_stats`, averaged by Serve over ``look_back_period_s``. Serve then applies the config's ``min_replicas``,
``max_replicas``, ``upscale_delay_s``, ``downscale_delay_s`` and scaling factors to the result.
Parameters (``policy_kwargs``): ``kv_target`` (0-1, default 0.75), ``queue_target`` (default 2).
"""

from __future__ import annotations

from typing import Any


class KVPressurePolicy:
    def __init__(self, kv_target: float = 0.75, queue_target: float = 2.0) -> None:
        if not 0 < kv_target <= 1:
            raise ValueError(f"kv_target must be in (0, 1], got {kv_target!r}")
        if queue_target <= 0:
            raise ValueError(f"queue_target must be > 0, got {queue_target!r}")
        self.kv_target = kv_target
        self.queue_target = queue_target

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        current = ctx.current_num_replicas
        if current == 0:
            return ctx.target_num_replicas, {}
        target_requests = ctx.config.get_target_ongoing_requests()
        metrics = ctx.aggregated_metrics or {}
        channels = sum((metrics.get("channels") or {}).values())
        demand = {"requests": max(0.0, ctx.total_num_requests - channels) / target_requests}
        for name, target, key in (("kv_used_fraction", self.kv_target, "kv"),
                                  ("waiting", self.queue_target, "queue")):
            values = list((metrics.get(name) or {}).values())
            if values:
                demand[key] = current * (sum(values) / len(values)) / target
        return max(demand.values()), {"demand": demand}
