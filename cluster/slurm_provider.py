"""A Ray autoscaler node provider for Slurm: each worker node is one Slurm batch job.

Ray's autoscaler (v2, which :mod:`cluster.node` turns on for the head) asks the provider for
nodes of a type declared in the cluster YAML (cluster/autoscaler.yaml) and gives them back when
they idle past ``idle_timeout_minutes``. Here:

- ``create_node``: ``sbatch`` the worker script (cluster/slurm/worker.sbatch) once per node,
  named after the cluster (the namespace: ``cluster_name``, which the head makes unique per
  batch job), with the node type's ``sbatch_args``. The job's comment holds the autoscaler's
  tags as JSON; its environment carries the head's address, the node type and its resources.
  The job runs ``python -m cluster.node worker``, which reports the job id to Ray as the
  node's cloud instance id; that is how the autoscaler matches Ray nodes to these jobs.
- ``non_terminated_nodes``: ``squeue`` the cluster's jobs (pending, configuring or running).
  A job that ended (crashed, timed out, cancelled from outside) is simply no longer listed,
  which the autoscaler takes as a node gone; it launches a replacement if demand remains.
- ``terminate_nodes``: ``scancel`` the jobs.

The head (started by the batch script, not by the provider) is listed too, as a running node of
``head_node_type`` with the id ``head_id``, which the head reports as its instance id: Ray's
autoscaler starts scaling only once it sees the head among the provider's nodes. It is never
cancelled from here.

Provider settings (``provider:`` in the YAML): ``disable_node_updaters: true`` (required: the
job starts Ray itself; there is no SSH), ``head_address``, ``head_id``, ``head_node_type`` and
``log_dir`` (filled in by the head at start), ``worker_script`` (relative to the repository
root) and ``sbatch_args`` (for every type, e.g. an account). Node types set
``node_config: {sbatch_args: [...]}``.

Every method is thread-safe: state is Slurm's; the last ``squeue`` listing is cached under a
lock to answer per-node questions between listings.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.autoscaler.node_launch_exception import NodeLaunchException
from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import (NODE_KIND_HEAD, STATUS_UP_TO_DATE, TAG_RAY_NODE_KIND,
                                 TAG_RAY_NODE_STATUS, TAG_RAY_USER_NODE_TYPE)

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "RESIZING", "SUSPENDED", "REQUEUED",
          "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
"""squeue states of a job that has not ended (COMPLETING counts as ended)."""
TIMEOUT_S = 30


@dataclass
class Job:
    job_id: str
    state: str
    nodes: str
    tags: dict[str, str] = field(default_factory=dict)


def parse_squeue(text: str) -> list[Job]:
    """Rows of ``squeue --noheader --format='%i %T %N %k'``; comments hold JSON tags."""
    jobs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        job_id, state, nodes, comment = (line.split(" ", 3) + ["", "", ""])[:4]
        try:
            tags = json.loads(comment) if comment.strip() else {}
        except json.JSONDecodeError:
            tags = {}
        jobs.append(Job(job_id, state, nodes, tags if isinstance(tags, dict) else {}))
    return jobs


def sbatch_argv(cluster_name: str, tags: dict[str, str], log_dir: str,
                common_args: list[str], type_args: list[str], script: str) -> list[str]:
    return ["sbatch", "--parsable", f"--job-name={cluster_name}",
            f"--comment={json.dumps(tags, separators=(',', ':'))}",
            f"--output={log_dir}/%x-%j.out", *common_args, *type_args, script]


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{argv[0]} failed: {exc}") from exc
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} ... exited {done.returncode}: "
                           f"{done.stderr.strip()}")
    return done.stdout


class SlurmNodeProvider(NodeProvider):
    """Ray worker nodes as Slurm jobs (see the module docstring)."""

    def __init__(self, provider_config: dict[str, Any], cluster_name: str) -> None:
        super().__init__(provider_config, cluster_name)
        if not provider_config.get("disable_node_updaters"):
            raise ValueError("provider.disable_node_updaters must be true: Slurm jobs start "
                             "Ray themselves (there is no SSH setup)")
        self.head_address = provider_config.get("head_address", "")
        self.head = Job(provider_config.get("head_id", "head"), "RUNNING", socket.gethostname(),
                        {TAG_RAY_NODE_KIND: NODE_KIND_HEAD, TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE,
                         TAG_RAY_USER_NODE_TYPE: provider_config.get("head_node_type", "head")})
        self.log_dir = provider_config.get("log_dir", os.getcwd())
        script = Path(provider_config.get("worker_script", "cluster/slurm/worker.sbatch"))
        self.script = str(script if script.is_absolute() else REPO / script)
        self.common_args = list(provider_config.get("sbatch_args", []))
        self.user = getpass.getuser()
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}

    # listing

    def _refresh(self) -> dict[str, Job]:
        out = _run(["squeue", "--noheader", f"--name={self.cluster_name}", f"--user={self.user}",
                    "--format=%i %T %N %k"])
        jobs = {j.job_id: j for j in parse_squeue(out) if j.state in ACTIVE}
        jobs[self.head.job_id] = self.head
        with self._lock:
            self._jobs = jobs
        return jobs

    def _job(self, node_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(node_id)

    def non_terminated_nodes(self, tag_filters: dict[str, str]) -> list[str]:
        return [j.job_id for j in self._refresh().values()
                if all(j.tags.get(k) == v for k, v in tag_filters.items())]

    def is_running(self, node_id: str) -> bool:
        job = self._job(node_id)
        return job is not None and job.state == "RUNNING"

    def is_terminated(self, node_id: str) -> bool:
        return self._job(node_id) is None

    def node_tags(self, node_id: str) -> dict[str, str]:
        job = self._job(node_id)
        return dict(job.tags) if job else {}

    def internal_ip(self, node_id: str) -> str:
        job = self._job(node_id)
        if job is None or not job.nodes:
            return ""
        try:
            return socket.gethostbyname(job.nodes)
        except OSError:
            return job.nodes

    def external_ip(self, node_id: str) -> str:
        return self.internal_ip(node_id)

    # changes

    def set_node_tags(self, node_id: str, tags: dict[str, str]) -> None:
        job = self._job(node_id)
        merged = {**(job.tags if job else {}), **tags}
        _run(["scontrol", "update", f"JobId={node_id}",
              f"Comment={json.dumps(merged, separators=(',', ':'))}"])
        with self._lock:
            if node_id in self._jobs:
                self._jobs[node_id].tags = merged

    def create_node(self, node_config: dict[str, Any], tags: dict[str, str],
                    count: int) -> dict[str, Any]:
        return self.create_node_with_resources_and_labels(node_config, tags, count, {}, {})

    def create_node_with_resources_and_labels(
            self, node_config: dict[str, Any], tags: dict[str, str], count: int,
            resources: dict[str, float], labels: dict[str, str]) -> dict[str, Any]:
        node_type = tags.get(TAG_RAY_USER_NODE_TYPE, "")
        env = {**os.environ, "OPTGPTQ_HEAD_ADDRESS": self.head_address,
               "OPTGPTQ_NODE_TYPE": node_type, "OPTGPTQ_NODE_RESOURCES": json.dumps(resources)}
        argv = sbatch_argv(self.cluster_name, tags, self.log_dir, self.common_args,
                           list(node_config.get("sbatch_args", [])), self.script)
        created = {}
        for _ in range(count):
            try:
                done = subprocess.run(argv, capture_output=True, text=True, env=env,
                                      timeout=TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise NodeLaunchException("sbatch failed", str(exc), None) from exc
            if done.returncode != 0:
                raise NodeLaunchException("sbatch failed", done.stderr.strip(), None)
            job_id = done.stdout.strip().split(";")[0]
            logger.info("SlurmNodeProvider: submitted job %s for a %s node", job_id, node_type)
            created[job_id] = {"job_id": job_id}
            with self._lock:
                self._jobs[job_id] = Job(job_id, "PENDING", "", dict(tags))
        return created

    def terminate_nodes(self, node_ids: list[str]) -> dict[str, Any]:
        jobs = [n for n in node_ids if n != self.head.job_id]  # the head is the batch job's
        if jobs:
            _run(["scancel", *jobs])
            with self._lock:
                for node_id in jobs:
                    self._jobs.pop(node_id, None)
            logger.info("SlurmNodeProvider: cancelled jobs %s", ", ".join(jobs))
        return {node_id: {} for node_id in node_ids}

    def terminate_node(self, node_id: str) -> dict[str, Any]:
        return self.terminate_nodes([node_id])
