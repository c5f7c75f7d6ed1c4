"""Application builder: ``import_path: deployments.app:build_app`` in deployments/optgptq.yaml.

The ``args`` of the YAML application are validated once, here, by :class:`AppConfig`; every
error names the offending field (``engine.block_size``, ``router.policy``, ...). The builder
binds three deployments: the engine replicas (:mod:`deployments.replica`, routed by
:mod:`deployments.router`), the router actor holding the prefix index
(:mod:`deployments.prefix_index`) and the HTTP + gRPC ingress (:mod:`deployments.ingress`).
``backend`` picks the engine inside each replica: ``native`` (this project's) or ``vllm``
(vLLM's async engine, :mod:`optgptq.serving.vllm_engine`); router, endpoints and metrics are the
same for both, and so are the ``engine:`` settings (``vllm:`` adds vLLM-only arguments).
Replicas take ``replicas.num_gpus`` GPUs each where that is set (cluster/deploy.py sets 1 on
accelerator clusters, also when the GPUs are still to come from node autoscaling); unset, one GPU
where the cluster has GPUs at build time, else a fraction of a CPU (``replicas.num_cpus``), so
two replicas fit on a 2-core machine.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

import ray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve.config import AutoscalingConfig

from deployments.auth import ENV_VAR, collect_keys
from deployments.ingress import Ingress
from deployments.prefix_index import PrefixIndexService
from deployments.replica import EngineReplica
from optgptq.config import EngineConfig
from optgptq.models.hub import resolve_model
from optgptq.serving.vllm_engine import INSTALL_HINT, check_extra_args, vllm_available

ONE_LOOP = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
            "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
"""Serve runs user code and the handle's router on the replica's own event loop: a streamed
chunk then crosses no thread inside the process (each crossing costs a wake-up and the GIL)."""
HEAD_NODE = "node:__internal_head__"
"""Ray's resource of the head node."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RouterConfig(_Strict):
    """Routing policy and the prefix-aware parameters (optgptq.serving.router_index)."""

    policy: Literal["prefix_aware", "pow2", "round_robin"] = "prefix_aware"
    load_token_cost: float = Field(256.0, ge=0)
    balance_abs: int = Field(4, ge=0)
    balance_rel: float = Field(1.5, ge=1)
    claim_ttl_s: float = Field(30.0, gt=0)
    stats_period_s: float = Field(1.0, gt=0)
    """Serve's request_routing_stats_period_s: how often replicas report load to routers."""

    def index_params(self, block_size: int) -> dict[str, Any]:
        """The prefix index's RouterParams (block_size: the engine's)."""
        return {"block_size": block_size, "load_token_cost": self.load_token_cost,
                "balance_abs": self.balance_abs, "balance_rel": self.balance_rel,
                "claim_ttl_s": self.claim_ttl_s}


class ReplicasConfig(_Strict):
    """The engine deployment: fixed ``num_replicas`` or an ``autoscaling_config``."""

    num_replicas: int | None = Field(None, ge=1)
    autoscaling_config: dict[str, Any] | None = None
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float | None = Field(None, ge=0)
    """GPUs per replica; unset: 1 where the cluster has GPUs when the app is built, else 0."""
    max_ongoing_requests: int = Field(32, ge=1)
    """Requests one replica accepts at once (its engine batches them)."""
    max_queued_requests: int = Field(64, ge=1)
    """Requests queued at a router beyond that; more get HTTP 429 / RESOURCE_EXHAUSTED."""
    max_waiting: int = Field(64, ge=1)
    """Requests waiting inside one engine; more get HTTP 503 / RESOURCE_EXHAUSTED."""

    @field_validator("autoscaling_config")
    @classmethod
    def _serve_autoscaling(cls, value):
        if value is not None:
            AutoscalingConfig(**value)  # Serve's own validation, once, here
        return value

    @model_validator(mode="after")
    def _one_of(self):
        if (self.num_replicas is None) == (self.autoscaling_config is None):
            raise ValueError("give exactly one of num_replicas and autoscaling_config")
        return self


class IngressConfig(_Strict):
    """The ingress replicas: they serve HTTP and gRPC themselves (Serve's proxies are off)."""

    num_replicas: int = Field(1, ge=1)
    """Ingress processes; on one host they share the ports (SO_REUSEPORT)."""
    num_cpus: float = Field(0.0, ge=0)
    """CPUs Ray reserves per ingress replica. None by default: pinned to the head node, an
    ingress that reserved CPUs could wait forever behind engine replicas holding them all."""
    max_request_bytes: int = Field(1 << 20, ge=1024)
    """Largest HTTP body or gRPC message accepted (413 / INVALID_ARGUMENT beyond)."""
    admission_timeout_s: float = Field(1.0, gt=0)
    """How long a request may wait in Serve's queue for a free engine replica; then 503 with
    Retry-After (RESOURCE_EXHAUSTED over gRPC): clients see a bounded wait, never a stall. (The
    engine's own acceptance after routing, at most one step, is not bounded by it.)"""
    host: str = "127.0.0.1"
    """Interface both servers listen on (0.0.0.0: every interface)."""
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(9000, ge=1, le=65535)
    on_head_node: bool = True
    """Place the ingress replicas on the Ray head node, where clients find the endpoint."""
    api_keys: list[str] = Field(default_factory=list)
    """API keys (deployments/auth.py; also ``api_keys_file`` and $OPTGPTQ_API_KEYS). None
    configured: no authentication, allowed only when ``host`` is a loopback address."""
    api_keys_file: str | None = None
    """A file of keys, one per line: ``KEY [TENANT]`` (keys of one tenant share its cache)."""
    auth_health: bool = False
    """Whether /health needs a key too (load balancers usually probe without one)."""
    auth_metrics: bool = True
    """Whether /metrics needs a key (when keys are configured)."""
    replica_header: bool = False
    """Name the serving engine replica in an ``x-optgptq-replica`` response header (debugging
    and tests; off, no internal id leaves the cluster)."""

    @model_validator(mode="after")
    def _ports(self):
        if self.http_port == self.grpc_port:
            raise ValueError("http_port and grpc_port must differ")
        return self

    def keys(self) -> dict[str, str]:
        """Digest -> tenant of every configured key; ValueError if the endpoint would listen
        beyond this machine without any."""
        keys = collect_keys(self.api_keys, self.api_keys_file)
        if not keys and not _loopback(self.host):
            raise ValueError(f"host {self.host!r} is reachable from other machines: set API keys "
                             f"(ingress.api_keys_file, ingress.api_keys or ${ENV_VAR})")
        return keys


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


class SyntheticConfig(_Strict):
    """``backend: synthetic`` (no model: tokens at no cost, for measuring the serving layer)."""

    step_time_s: float = Field(0.0, ge=0)
    """0: all of a request's tokens in one step; > 0: one token per request per step, a step
    every step_time_s (an accelerator's step time, emulated)."""


class AppConfig(_Strict):
    """Everything the YAML's ``args`` may set."""

    model: str = "smollm2"
    """``smollm2``, or a local HF folder (also a quantized checkpoint folder)."""
    served_model_name: str | None = None
    """The name clients pass as ``model``; default: the ``model`` value."""
    backend: Literal["native", "vllm", "synthetic"] = "native"
    """The engine in each replica: this project's, vLLM's (needs vLLM installed), or none
    (``synthetic``: tokens at no cost, to measure the serving layer)."""
    engine: dict[str, Any] = Field(default_factory=dict)
    """EngineConfig fields except ``model`` (block_size, kv_cache_bytes, max_num_seqs, ...)."""
    vllm: dict[str, Any] = Field(default_factory=dict)
    """Further vLLM engine arguments (e.g. ``enforce_eager: true``); only with backend vllm."""
    synthetic: SyntheticConfig | None = None
    """Only with backend synthetic."""
    replicas: ReplicasConfig = Field(default_factory=lambda: ReplicasConfig(num_replicas=2))
    router: RouterConfig = Field(default_factory=RouterConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)

    @field_validator("engine")
    @classmethod
    def _engine(cls, value):
        if "model" in value:
            raise ValueError("set the model at the top level (model:), not under engine")
        EngineConfig.from_dict({"device": "cpu", **value})  # field errors name the field
        return value

    @model_validator(mode="after")
    def _backend(self):
        if self.backend == "vllm":
            if not vllm_available():
                raise ValueError(INSTALL_HINT)
            check_extra_args(self.vllm)
        elif self.vllm:
            raise ValueError("vllm: arguments for vLLM are only used with backend: vllm")
        if self.synthetic is not None and self.backend != "synthetic":
            raise ValueError("synthetic: only used with backend: synthetic")
        return self

    def backend_args(self) -> dict[str, Any]:
        """What the replicas' engine takes beyond the ``engine:`` settings."""
        if self.backend == "vllm":
            return dict(self.vllm)
        if self.backend == "synthetic":
            return (self.synthetic or SyntheticConfig()).model_dump()
        return {}


def parse_config(args: dict[str, Any]) -> AppConfig:
    """Validate the application args; ValueError names the field (``engine: block_size ...``)."""
    try:
        config = AppConfig.model_validate(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "args"
        raise ValueError(f"optgptq app config: {where}: {err['msg']}") from None
    try:
        resolve_model(config.model)
    except ValueError as exc:
        raise ValueError(f"optgptq app config: model: {exc}") from None
    try:
        config.ingress.keys()
    except ValueError as exc:
        raise ValueError(f"optgptq app config: ingress: {exc}") from None
    return config


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder."""
    config = parse_config(args)
    engine = {"model": config.model, **config.engine}
    r = config.replicas
    gpus = r.num_gpus
    if gpus is None:
        gpus = int(ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1
                   and engine.get("device", "auto") != "cpu")
    actor = {"num_gpus": gpus} if gpus else {"num_cpus": r.num_cpus}
    if 0 < gpus < 1:  # replicas sharing a GPU: each sizes its KV pool from its share
        engine.setdefault("accelerator_share", gpus)
    actor["runtime_env"] = {"env_vars": dict(ONE_LOOP)}
    scaling = ({"num_replicas": r.num_replicas} if r.num_replicas is not None
               else {"autoscaling_config": r.autoscaling_config})
    rc = config.router
    params = rc.index_params(EngineConfig.from_dict({"device": "cpu", **config.engine}).block_size)
    index = PrefixIndexService.bind(params)
    replicas = serve.deployment(EngineReplica).options(
        name="EngineReplica", ray_actor_options=actor,
        # + one token channel per ingress replica (deployments/token_channel.py)
        max_ongoing_requests=r.max_ongoing_requests + config.ingress.num_replicas,
        max_queued_requests=r.max_queued_requests, health_check_period_s=2,
        request_router_config={
            "request_router_class": "deployments.router:OptGPTQRouter",
            "request_router_kwargs": {"policy": rc.policy, **params},
            "request_routing_stats_period_s": rc.stats_period_s},
        **scaling,
    ).bind(engine, index, max_waiting=r.max_waiting, backend=config.backend,
           backend_args=config.backend_args())
    ing = config.ingress
    placement = {"resources": {HEAD_NODE: 0.001}} if ing.on_head_node else {}
    expected = r.num_replicas or max(1, (r.autoscaling_config or {}).get("min_replicas", 1))
    return serve.deployment(Ingress).options(
        name="Ingress", num_replicas=ing.num_replicas,
        ray_actor_options={"num_cpus": ing.num_cpus, "runtime_env": {"env_vars": dict(ONE_LOOP)},
                           **placement},
    ).bind(replicas, index, config.served_model_name or config.model,
           str(resolve_model(config.model)),
           ing.model_copy(update={"api_keys": [], "api_keys_file": None}), ing.keys(),
           expected_replicas=expected)


def deploy(args: dict[str, Any], name: str = "optgptq") -> None:
    """Deploy the application on the connected Ray cluster the way ``serve run
    deployments/optgptq.yaml`` does (Serve's proxies off: the ingress replicas serve); for
    tests and benchmarks. Serve's ``serve.run`` then waits until it is running."""
    serve.start(proxy_location="Disabled")
    serve.run(build_app(args), name=name, route_prefix="/")
