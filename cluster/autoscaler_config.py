"""The Ray cluster YAML for Slurm node autoscaling: checked, rendered for one head, counted.

cluster/autoscaler.yaml is written once by the user; at start the head (cluster.node) renders a
copy for its batch job with :func:`render`: ``provider.head_address`` (where worker jobs join),
``provider.log_dir`` (their output) and ``cluster_name`` suffixed with the job id, so that two
batch jobs of one user never see each other's workers. cluster.deploy reads the same copy with
:func:`max_autoscaled_gpus` to bound the replica autoscaling by the accelerators that Slurm can
still add. Errors are ValueError naming the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml

PROVIDER_MODULE = "cluster.slurm_provider.SlurmNodeProvider"
NO_SETUP = {"initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
            "rsync_exclude": [], "rsync_filter": []}
"""Cluster-launcher fields Ray's config loader expects; Slurm jobs need none of them."""


def check(config: Any) -> dict:
    """The fields this project relies on; ValueError names the first bad one."""
    if not isinstance(config, dict):
        raise ValueError("autoscaler config: not a YAML mapping")
    provider = config.get("provider")
    if not isinstance(provider, dict) or provider.get("module") != PROVIDER_MODULE \
            or provider.get("type") != "external":
        raise ValueError(f"autoscaler config: provider: want type: external, module: "
                         f"{PROVIDER_MODULE}")
    if provider.get("disable_node_updaters") is not True:
        raise ValueError("autoscaler config: provider.disable_node_updaters must be true")
    types = config.get("available_node_types")
    head = config.get("head_node_type")
    if not isinstance(types, dict) or head not in types:
        raise ValueError("autoscaler config: head_node_type must name one of "
                         "available_node_types")
    if len(types) < 2:
        raise ValueError("autoscaler config: available_node_types: no worker node types "
                         "(the nodes Slurm can add)")
    for name, spec in types.items():
        if name == head:
            continue
        resources = spec.get("resources") if isinstance(spec, dict) else None
        if not isinstance(resources, dict) or not resources.get("CPU"):
            raise ValueError(f"autoscaler config: available_node_types.{name}.resources must "
                             "declare the node's CPU (and GPU) count")
        args = spec.get("node_config", {}).get("sbatch_args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ValueError(f"autoscaler config: available_node_types.{name}.node_config."
                             "sbatch_args must be a list of strings")
    return config


def load(path: Path) -> dict:
    try:
        return check(yaml.safe_load(Path(path).read_text()))
    except OSError as exc:
        raise ValueError(f"autoscaler config: cannot read {path}: {exc}") from None


def render(path: Path, head_address: str, env: Mapping[str, str]) -> tuple[Path, dict]:
    """Write the copy for this batch job into $OPTGPTQ_JOB_DIR (default: the current folder).

    Besides the address and log folder, the provider learns the head's instance id and node
    type: Ray's autoscaler scales only once it sees the head as one of the provider's nodes.
    """
    config = load(path)
    job = env.get("SLURM_JOB_ID", str(os.getpid()))
    out_dir = Path(env.get("OPTGPTQ_JOB_DIR") or ".").resolve()
    config = {**NO_SETUP, **config,
              "cluster_name": f"{config.get('cluster_name', 'optgptq')}-{job}"}
    config["provider"] = {**config["provider"], "head_address": head_address,
                          "log_dir": str(out_dir), "head_id": f"{job}-head",
                          "head_node_type": config["head_node_type"]}
    out = out_dir / "autoscaler.yaml"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(out)
    return out, config


def max_autoscaled_gpus(config: dict) -> int:
    """GPUs that Slurm can add at most: sum over worker types of max_workers x GPU, capped by
    the cluster-wide max_workers (taking the GPU-richest types first)."""
    head = config.get("head_node_type")
    per_node = sorted(((int(spec.get("resources", {}).get("GPU", 0)),
                        int(spec.get("max_workers", 0)))
                       for name, spec in config["available_node_types"].items() if name != head),
                      reverse=True)
    budget = int(config.get("max_workers", sum(n for _, n in per_node)))
    total = 0
    for gpus, count in per_node:
        take = min(count, budget)
        total += gpus * take
        budget -= take
    return total
