"""Prometheus metrics of the serving layer, exposed as text on the ingress's GET /metrics.

Request-side series (requests by endpoint and status, prompt and generated tokens, time to
first token and inter-token latency histograms) are observed by the ingress process that served
the request. Replica-side gauges (free and cached KV blocks, waiting and running requests,
tokens/s, prefix hit rate) are refreshed from the replicas' latest published stats on every
scrape, labelled by replica id; replicas that are gone lose their series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_REPLICA_GAUGES = {
    "free_blocks": "KV cache blocks allocatable now (free or evictable)",
    "cached_blocks": "KV cache blocks holding reusable prefixes with no owner",
    "num_blocks": "KV cache blocks in the pool",
    "waiting": "requests waiting in the engine",
    "running": "requests running in the engine",
    "tokens_per_s": "generated tokens per second over the last 10 s",
}


class ServingMetrics:
    """One registry per ingress process; ``render()`` gives the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("optgptq_requests", "requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("optgptq_prompt_tokens", "prompt tokens of finished "
                                     "requests", registry=r)
        self.generation_tokens = Counter("optgptq_generation_tokens", "generated tokens",
                                         registry=r)
        self.cached_tokens = Counter("optgptq_prefix_cached_tokens", "prompt tokens served "
                                     "from the prefix cache, by replica", ["replica"], registry=r)
        self.ttft = Histogram("optgptq_time_to_first_token_seconds", "request arrival to "
                              "first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("optgptq_inter_token_latency_seconds", "time between streamed "
                             "tokens", buckets=_LATENCY_BUCKETS, registry=r)
        self.prefix_hit_rate = Gauge("optgptq_prefix_hit_rate", "cached / all prompt tokens "
                                     "admitted, by replica", ["replica"], registry=r)
        self.replica_gauges = {
            name: Gauge(f"optgptq_replica_{name}", doc, ["replica"], registry=r)
            for name, doc in _REPLICA_GAUGES.items()}
        self._replicas: set[str] = set()

    def observe_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def observe_finished(self, replica: str, prompt_tokens: int, cached_tokens: int,
                         generated_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)
        self.cached_tokens.labels(replica=replica).inc(cached_tokens)

    def update_replicas(self, stats: dict[str, dict]) -> None:
        """Set the per-replica gauges from ``{replica: stats}``; drop replicas not present."""
        for gone in self._replicas - set(stats):
            for gauge in [self.prefix_hit_rate, *self.replica_gauges.values()]:
                gauge.remove(gone)
        self._replicas = set(stats)
        for replica, s in stats.items():
            for name, gauge in self.replica_gauges.items():
                gauge.labels(replica=replica).set(s[name])
            admitted = s["prefix_hit_tokens"] + s["prefix_miss_tokens"]
            self.prefix_hit_rate.labels(replica=replica).set(
                s["prefix_hit_tokens"] / admitted if admitted else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
