"""Start Ray on one node of a Slurm job: ``python -m cluster.node head|worker|ip``.

The batch script (cluster/slurm/optgptq.sbatch) runs ``head`` on the first node and ``worker`` on
the others, one srun task per node; the Slurm node provider's jobs (cluster/slurm/worker.sbatch)
run ``worker`` too. Each command checks before it starts anything (``--check``: only that): Ray
is importable by this Python, the node's fixed ports are free, the head is reachable (workers),
the autoscaler YAML is sound (head). Then it counts the node's accelerators
(:mod:`cluster.detect`), adjusts the device masks for Ray, and replaces itself with ``ray start
--block`` (the Slurm step lives as long as Ray does; when Slurm ends the step, Ray's reaper
stops Ray's processes). ``ip`` prints the address Ray will use on this node.

Port plan (:class:`PortPlan`; every number is an ``OPTGPTQ_*`` variable of the same name):
the head's GCS ``RAY_PORT`` 6379, dashboard ``DASHBOARD_PORT`` 8265, Ray client
``CLIENT_PORT`` 10001, and the Serve endpoint's ``HTTP_PORT`` 8000 and ``GRPC_PORT`` 9000
(cluster.deploy binds them). ``NODE_PORTS`` = B > 0 fixes every node's own ports too: node
manager B, object manager B+1, runtime-env agent B+2, dashboard agent gRPC B+3 and HTTP B+4,
metrics B+5, worker processes B+100..B+999; 0 (default) lets Ray pick free ones, which also
lets several Ray nodes share one host.

Other settings: ``OPTGPTQ_NUM_CPUS`` (default: the Slurm task's CPUs), ``OPTGPTQ_NUM_GPUS``
(default: detected), ``OPTGPTQ_IFACE`` (network interface whose address Ray uses, e.g.
``ib0``; default: the one routing to the head), ``OPTGPTQ_TEMP_DIR`` (Ray's session folder,
default /tmp/ray-<user>: one per user, so users sharing a node do not collide),
``OPTGPTQ_AUTOSCALER`` (head: a Ray cluster YAML for :mod:`cluster.slurm_provider`). A node
started by the provider gets ``OPTGPTQ_NODE_TYPE`` and ``OPTGPTQ_NODE_RESOURCES`` (the type's
resources, JSON) and reports its Slurm job id to Ray's autoscaler as its instance id.
"""

from __future__ import annotations

import argparse
import fcntl
import getpass
import importlib.util
import json
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from cluster import detect


RAY_WORKER_PORTS = (10002, 19999)
"""Ray's own range for worker processes when OPTGPTQ_NODE_PORTS is 0."""


class SetupError(Exception):
    """A configuration problem found before Ray starts; the message says what to change."""


@dataclass(frozen=True)
class PortPlan:
    ray: int = 6379
    dashboard: int = 8265
    client: int = 10001
    http: int = 8000
    grpc: int = 9000
    node: int = 0
    """Base of this node's own ports; 0: Ray picks free ones."""

    def node_flags(self) -> list[str]:
        if not self.node:
            return []
        b = self.node
        return [f"--node-manager-port={b}", f"--object-manager-port={b + 1}",
                f"--runtime-env-agent-port={b + 2}", f"--dashboard-agent-grpc-port={b + 3}",
                f"--dashboard-agent-listen-port={b + 4}", f"--metrics-export-port={b + 5}",
                f"--min-worker-port={b + 100}", f"--max-worker-port={b + 999}"]

    def head_flags(self) -> list[str]:
        return [f"--port={self.ray}", f"--dashboard-port={self.dashboard}",
                f"--ray-client-server-port={self.client}"]

    def fixed(self, head: bool) -> dict[str, int]:
        """The ports this node must find free, by the variable that sets them."""
        ports = {"OPTGPTQ_RAY_PORT": self.ray, "OPTGPTQ_DASHBOARD_PORT": self.dashboard,
                 "OPTGPTQ_CLIENT_PORT": self.client, "OPTGPTQ_HTTP_PORT": self.http,
                 "OPTGPTQ_GRPC_PORT": self.grpc} if head else {}
        if self.node:
            ports.update({f"OPTGPTQ_NODE_PORTS+{i}": self.node + i for i in range(6)})
        return ports


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise SetupError(f"{name}={value!r} is not an integer") from None


def port_plan(env: Mapping[str, str]) -> PortPlan:
    """The plan from OPTGPTQ_* variables; SetupError names a bad one."""
    d = PortPlan()
    plan = PortPlan(ray=_int_env(env, "OPTGPTQ_RAY_PORT", d.ray),
                    dashboard=_int_env(env, "OPTGPTQ_DASHBOARD_PORT", d.dashboard),
                    client=_int_env(env, "OPTGPTQ_CLIENT_PORT", d.client),
                    http=_int_env(env, "OPTGPTQ_HTTP_PORT", d.http),
                    grpc=_int_env(env, "OPTGPTQ_GRPC_PORT", d.grpc),
                    node=_int_env(env, "OPTGPTQ_NODE_PORTS", d.node))
    for name, port in plan.fixed(head=True).items():
        if not 1 <= port <= 65535:
            raise SetupError(f"{name}={port} is not a port number")
    if not 0 <= plan.node <= 65535 - 999:
        raise SetupError(f"OPTGPTQ_NODE_PORTS={plan.node}: 0, or a base with base+999 <= 65535")
    workers = (plan.node + 100, plan.node + 999) if plan.node else RAY_WORKER_PORTS
    for name, port in plan.fixed(head=True).items():
        if workers[0] <= port <= workers[1]:
            raise SetupError(f"{name}={port} is inside the worker processes' ports "
                             f"{workers[0]}-{workers[1]}")
    return plan


def ports_in_use(ports: Mapping[str, int]) -> dict[str, int]:
    """The ports of ``ports`` that something on this host already listens on."""
    busy = {}
    for name, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                busy[name] = port
    return busy


def iface_ip(iface: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", iface[:15].encode()))
        except OSError:
            raise SetupError(f"OPTGPTQ_IFACE={iface}: no IPv4 address on that interface") from None
    return socket.inet_ntoa(packed[20:24])


def node_ip(env: Mapping[str, str], toward: str | None = None) -> str:
    """This node's address for Ray: OPTGPTQ_IFACE's, else the one routing to ``toward``."""
    if env.get("OPTGPTQ_IFACE"):
        return iface_ip(env["OPTGPTQ_IFACE"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((toward or "10.255.255.255", 1))  # no packet is sent
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def wait_reachable(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise SetupError(f"the Ray head at {address} is not reachable after "
                                 f"{timeout_s:.0f} s ({exc})") from None
            time.sleep(1)


def node_shape(env: Mapping[str, str], acc: detect.Accelerators) -> tuple[int | None, int, dict]:
    """CPUs (None: Ray counts them), GPUs and custom resources this node advertises.

    Precedence: OPTGPTQ_NUM_CPUS / OPTGPTQ_NUM_GPUS, then the node type's declared resources
    (nodes of the Slurm provider), then the Slurm task's CPUs and the detected accelerators.
    """
    try:
        declared = json.loads(env.get("OPTGPTQ_NODE_RESOURCES") or "{}")
    except json.JSONDecodeError as exc:
        raise SetupError(f"OPTGPTQ_NODE_RESOURCES is not JSON: {exc}") from None
    if not isinstance(declared, dict):
        raise SetupError("OPTGPTQ_NODE_RESOURCES must be a JSON object")
    slurm_cpus = env.get("SLURM_CPUS_PER_TASK") or env.get("SLURM_CPUS_ON_NODE")
    cpus: int | None = int(declared.get("CPU", slurm_cpus or 0)) or None
    if env.get("OPTGPTQ_NUM_CPUS"):
        cpus = _int_env(env, "OPTGPTQ_NUM_CPUS", 0)
    gpus = _int_env(env, "OPTGPTQ_NUM_GPUS", int(declared.get("GPU", acc.count)))
    custom = {k: v for k, v in declared.items()
              if k not in ("CPU", "GPU", "memory", "object_store_memory")}
    return cpus, gpus, custom


def ray_start_argv(role: str, plan: PortPlan, ip: str, address: str | None, cpus: int | None,
                   gpus: int, resources: Mapping[str, float], temp_dir: str,
                   autoscaler: str | None = None) -> list[str]:
    """The ``ray start`` command for this node (run by this Python)."""
    argv = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
            f"--node-ip-address={ip}", f"--num-gpus={gpus}", "--disable-usage-stats"]
    if cpus is not None:
        argv.append(f"--num-cpus={cpus}")
    if resources:
        argv.append(f"--resources={json.dumps(dict(resources))}")
    argv.append(f"--temp-dir={temp_dir}")
    if role == "head":
        argv += ["--head", "--dashboard-host=127.0.0.1", *plan.head_flags()]
        if autoscaler:
            argv.append(f"--autoscaling-config={autoscaler}")
    else:
        argv.append(f"--address={address}")
    return argv + plan.node_flags()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cluster.node", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="role", required=True)
    h = sub.add_parser("head", help="start the Ray head on this node")
    w = sub.add_parser("worker", help="start a Ray worker joining the head")
    for role in (h, w):
        role.add_argument("--check", action="store_true",
                          help="only run the checks (Ray, ports, head reachable) and exit")
    w.add_argument("--address", default=os.environ.get("OPTGPTQ_HEAD_ADDRESS"),
                   help="the head's IP:PORT (default: $OPTGPTQ_HEAD_ADDRESS)")
    w.add_argument("--wait-s", type=float, default=300,
                   help="how long to wait for the head to accept connections")
    sub.add_parser("ip", help="print the address Ray will use on this node")
    return p


def prepare(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[list[str], dict]:
    """Everything before ``exec``: checks, detection; returns the argv and its environment."""
    if importlib.util.find_spec("ray") is None:
        raise SetupError(f"Ray is not installed for {sys.executable}: install it there with "
                         "`pip install 'ray[serve]'` (or `make install`), or point "
                         "OPTGPTQ_PYTHON at a Python that has it")
    plan = port_plan(env)
    head = args.role == "head"
    address = None if head else args.address
    if not head and not address:
        raise SetupError("worker: no head address (--address or OPTGPTQ_HEAD_ADDRESS)")
    busy = ports_in_use(plan.fixed(head))
    if busy:
        where = env.get("SLURMD_NODENAME") or socket.gethostname()
        listed = ", ".join(f"{port} ({name})" for name, port in busy.items())
        raise SetupError(f"port(s) in use on {where}: {listed}; another Ray or service holds "
                         "them; pick free ones through those variables")
    if address:
        wait_reachable(address, args.wait_s)
    ip = node_ip(env, address.rpartition(":")[0] if address else None)
    facts = detect.probe(env)
    acc = detect.classify(facts)
    cpus, gpus, resources = node_shape(env, acc)
    temp_dir = env.get("OPTGPTQ_TEMP_DIR") or f"/tmp/ray-{getpass.getuser()}"
    autoscaler = None
    child = {k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    for key, value in detect.ray_env(acc, facts.env, detect.ray_sees_amd()).items():
        if value is None:
            child.pop(key, None)
        else:
            child[key] = value
    if head and env.get("OPTGPTQ_AUTOSCALER"):
        from cluster.autoscaler_config import render

        try:
            path, config = render(Path(env["OPTGPTQ_AUTOSCALER"]), f"{ip}:{plan.ray}", env)
        except ValueError as exc:
            raise SetupError(f"OPTGPTQ_AUTOSCALER={env['OPTGPTQ_AUTOSCALER']}: {exc}") from None
        autoscaler = str(path)
        child["RAY_enable_autoscaler_v2"] = "1"
        child["RAY_CLOUD_INSTANCE_ID"] = config["provider"]["head_id"]
        child["RAY_NODE_TYPE_NAME"] = config["head_node_type"]
    if env.get("OPTGPTQ_NODE_TYPE"):  # started by the Slurm node provider
        child["RAY_NODE_TYPE_NAME"] = env["OPTGPTQ_NODE_TYPE"]
        child["RAY_CLOUD_INSTANCE_ID"] = env["SLURM_JOB_ID"]
    argv = ray_start_argv(args.role, plan, ip, address, cpus, gpus, resources, temp_dir,
                          autoscaler)
    print(f"optgptq node: {args.role} {env.get('SLURMD_NODENAME', socket.gethostname())} "
          f"({ip}): {acc.count} {acc.kind} accelerator(s) by {acc.source}, Ray gets "
          f"{gpus} GPU(s), {cpus if cpus is not None else 'all'} CPU(s)", flush=True)
    return argv, child


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.role == "ip":
            print(node_ip(os.environ))
            return
        cmd, env = prepare(args, os.environ)
    except SetupError as exc:
        print(f"optgptq node: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if not args.check:
        os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
