"""Deploy the Serve app on a running Ray cluster: ``python -m cluster.deploy --address HEAD:PORT``.

The batch script runs it on the head once Ray is up. It waits until ``--nodes`` Ray nodes have
joined, counts the cluster's accelerators (Ray's ``GPU`` resource, which cluster.node set from
its own count), writes the Serve config for this cluster and deploys it with ``serve run
--non-blocking`` (the app outlives this process), then waits until the app is RUNNING.

The config written (``--out``, default serve.yaml in $OPTGPTQ_JOB_DIR) is deployments/optgptq.yaml
(or ``--config``) with, for every application built by ``deployments.app:build_app``:

- one replica per accelerator: ``replicas.num_gpus: 1`` and ``num_replicas`` = the accelerators
  now in the cluster; with node autoscaling (``--autoscaler``, the head's rendered cluster
  YAML) an ``autoscaling_config`` from max(1, accelerators now) to accelerators now + the most
  that Slurm can add, so that replicas beyond the current nodes ask the autoscaler for nodes.
  The YAML's other autoscaling settings (targets, delays, policy) are kept. On a cluster with no
  accelerators, or for an app whose ``engine.device`` is ``cpu``, the YAML's replica settings
  stay as they are.
- the endpoint's host and ports (``args.ingress``: the ingress replicas serve HTTP and gRPC, on
  the head node) from ``--http-host`` / OPTGPTQ_HTTP_PORT / OPTGPTQ_GRPC_PORT, and its API keys
  file from ``--api-keys-file`` / OPTGPTQ_API_KEYS_FILE (or keys in $OPTGPTQ_API_KEYS): the
  default host, every interface, is refused without keys (deployments/auth.py).

``--stop`` shuts Serve down (replicas drain their requests); the batch script calls it when the
job ends. Exit status: 0 deployed, 1 the cluster or the app failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from cluster import autoscaler_config

REPO = Path(__file__).resolve().parent.parent
BUILDER = "deployments.app:build_app"


class DeployError(Exception):
    """The cluster or the app did not come up; the message says what was seen."""


def plan_replicas(replicas: dict[str, Any], gpus_now: int, gpus_max: int) -> dict[str, Any]:
    """The app's ``replicas`` args for a cluster with ``gpus_now`` accelerators (at most
    ``gpus_max`` with node autoscaling): one replica per accelerator."""
    if gpus_max <= 0:
        return dict(replicas)
    out = {k: v for k, v in replicas.items() if k not in ("num_replicas", "autoscaling_config")}
    out["num_gpus"] = 1
    if gpus_max <= gpus_now:
        out["num_replicas"] = gpus_now
        return out
    auto = dict(replicas.get("autoscaling_config") or {})
    auto["min_replicas"] = max(1, gpus_now)
    auto["max_replicas"] = gpus_max
    if "initial_replicas" in auto:
        auto["initial_replicas"] = min(max(auto["initial_replicas"], auto["min_replicas"]),
                                       gpus_max)
    out["autoscaling_config"] = auto
    return out


def render_serve_config(base: dict[str, Any], gpus_now: int, gpus_max: int, http_host: str,
                        http_port: int, grpc_port: int,
                        api_keys_file: str | None = None) -> dict[str, Any]:
    """The Serve config for this cluster (``base`` is left unchanged); ``api_keys_file`` sets
    ``ingress.api_keys_file`` (a host other than loopback needs keys)."""
    config = copy.deepcopy(base)
    if not isinstance(config.get("applications"), list):
        raise ValueError("serve config: applications: a list of applications is required")
    for app in config["applications"]:
        if app.get("import_path") == BUILDER:
            args = app.setdefault("args", {})
            ingress = args.setdefault("ingress", {})
            ingress.update(host=http_host, http_port=http_port, grpc_port=grpc_port)
            if api_keys_file:
                ingress["api_keys_file"] = api_keys_file
            on_cpu = (args.get("engine") or {}).get("device") == "cpu"
            args["replicas"] = plan_replicas(args.get("replicas") or {},
                                             0 if on_cpu else gpus_now, 0 if on_cpu else gpus_max)
    return config


def wait_for_nodes(ray, want: int, timeout_s: float) -> list[dict]:
    """The alive nodes once ``want`` have joined; DeployError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= want:
            return alive
        if time.monotonic() > deadline:
            seen = ", ".join(sorted(n["NodeManagerAddress"] for n in alive)) or "none"
            raise DeployError(f"{len(alive)} of {want} Ray nodes joined within {timeout_s:.0f} s "
                              f"(seen: {seen}); see the worker steps' output")
        time.sleep(2)


def wait_running(serve, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        status = str(app.status) if app else "NOT_STARTED"
        if status.endswith("RUNNING"):
            return
        if status.endswith("DEPLOY_FAILED"):
            raise DeployError(f"application {name} failed to deploy: {app.message}")
        if time.monotonic() > deadline:
            pending = app.message if app else ""
            raise DeployError(f"application {name} not running after {timeout_s:.0f} s "
                              f"(status {status}) {pending}".strip())
        time.sleep(2)


def _parser() -> argparse.ArgumentParser:
    env = os.environ
    p = argparse.ArgumentParser(prog="python -m cluster.deploy",
                                description=__doc__.split("\n")[0])
    p.add_argument("--address", required=True, help="the Ray head's IP:PORT")
    p.add_argument("--config", default=str(REPO / "deployments" / "optgptq.yaml"))
    p.add_argument("--nodes", type=int, default=1, help="Ray nodes to wait for (default 1)")
    p.add_argument("--wait-s", type=float, default=600, help="for the nodes, then for the app")
    p.add_argument("--autoscaler", help="the head's rendered cluster YAML (node autoscaling)")
    p.add_argument("--out", default=str(Path(env.get("OPTGPTQ_JOB_DIR") or ".") / "serve.yaml"))
    p.add_argument("--http-host", default=env.get("OPTGPTQ_HTTP_HOST") or "0.0.0.0")
    p.add_argument("--http-port", type=int, default=int(env.get("OPTGPTQ_HTTP_PORT") or 8000))
    p.add_argument("--grpc-port", type=int, default=int(env.get("OPTGPTQ_GRPC_PORT") or 9000))
    p.add_argument("--api-keys-file", default=env.get("OPTGPTQ_API_KEYS_FILE"),
                   help="API keys, one per line (KEY [TENANT]); or $OPTGPTQ_API_KEYS")
    p.add_argument("--stop", action="store_true", help="shut Serve down instead")
    return p


def deploy(args: argparse.Namespace) -> str:
    """Deploy; returns the line that tells where the endpoint is."""
    try:
        base = yaml.safe_load(Path(args.config).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--config {args.config}: {exc}") from None
    max_added = 0
    if args.autoscaler:
        max_added = autoscaler_config.max_autoscaled_gpus(
            autoscaler_config.load(Path(args.autoscaler)))
    import ray
    from ray import serve

    ray.init(address=args.address, namespace="serve", logging_level="ERROR",
             log_to_driver=False)
    nodes = wait_for_nodes(ray, args.nodes, args.wait_s)
    gpus_now = int(ray.cluster_resources().get("GPU", 0))
    config = render_serve_config(base, gpus_now, gpus_now + max_added, args.http_host,
                                 args.http_port, args.grpc_port, args.api_keys_file)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-m", "ray.serve.scripts", "run", str(out),
                           "--address", args.address, "--non-blocking"], cwd=REPO, env=env)
    if done.returncode != 0:
        raise DeployError(f"serve run {out} exited {done.returncode}")
    for app in config["applications"]:
        wait_running(serve, app["name"], args.wait_s)
    head = args.address.rpartition(":")[0]
    return (f"optgptq deploy: {len(nodes)} node(s), {gpus_now} accelerator(s) (+{max_added} by "
            f"autoscaling); OpenAI HTTP at http://{head}:{args.http_port}/v1, gRPC at "
            f"{head}:{args.grpc_port}; config {out}")


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.stop:
            import ray
            from ray import serve

            ray.init(address=args.address, namespace="serve", logging_level="ERROR")
            serve.shutdown()
            print("optgptq deploy: Serve shut down")
            return
        print(deploy(args), flush=True)
    except ValueError as exc:
        print(f"optgptq deploy: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (DeployError, ConnectionError) as exc:
        print(f"optgptq deploy: error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
