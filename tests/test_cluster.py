"""cluster/ logic that needs no Slurm and no Ray cluster: accelerator detection on faked devices,
the node launcher's settings and checks, the autoscaler YAML, the provider's parsing, the Serve
config written for a cluster, and the batch script's refusal outside an allocation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import venv
from argparse import Namespace
from pathlib import Path

import pytest
import yaml

from cluster import autoscaler_config, deploy, detect, node

ROOT = Path(__file__).resolve().parent.parent
P = detect.Probe


# accelerator detection


@pytest.mark.parametrize("probe, kind, count, source", [
    (P(torch_count=4, torch_names=("NVIDIA H100",) * 4), "cuda", 4, "torch"),
    (P(torch_count=8, torch_hip="6.2", kfd_vendors=(0x1002,) * 8), "rocm", 8, "torch"),
    # DTK: a HIP torch whose devices the KFD lists with Hygon's vendor id ...
    (P(torch_count=8, torch_hip="5.7", kfd_vendors=(0x1d94,) * 8), "dcu", 8, "torch"),
    # ... or whose device names say DCU, or a ROCM_PATH under DTK
    (P(torch_count=4, torch_hip="5.7", torch_names=("DCU K100_AI",) * 4), "dcu", 4, "torch"),
    (P(torch_count=2, torch_hip="5.7", env={"ROCM_PATH": "/opt/dtk-24.04"}), "dcu", 2, "torch"),
    # torch sees the masked devices only: its count wins over the driver listing
    (P(torch_count=2, torch_hip="5.7", kfd_vendors=(0x1d94,) * 8,
       env={"HIP_VISIBLE_DEVICES": "4,5"}), "dcu", 2, "torch"),
    # no torch (or a broken one): the driver listings under the masks
    (P(kfd_vendors=(0x1d94,) * 8, env={"HIP_VISIBLE_DEVICES": "0,1,2"}), "dcu", 3, "kfd"),
    (P(kfd_vendors=(0x1002,) * 8, env={"ROCR_VISIBLE_DEVICES": "0,1,2,3",
                                       "HIP_VISIBLE_DEVICES": "1"}), "rocm", 1, "kfd"),
    (P(kfd_vendors=(0x1002,) * 4, env={"CUDA_VISIBLE_DEVICES": "2,3"}), "rocm", 2, "kfd"),
    (P(nvidia_count=8, env={"CUDA_VISIBLE_DEVICES": "0,1,2"}), "cuda", 3, "nvidia"),
    (P(nvidia_count=8, env={"CUDA_VISIBLE_DEVICES": ""}), "cpu", 0, "none"),
    (P(kfd_vendors=(0x1d94,) * 8, env={"HIP_VISIBLE_DEVICES": "NoDevFiles"}), "cpu", 0, "none"),
    (P(torch_count=0), "cpu", 0, "none"),
    (P(), "cpu", 0, "none"),
])
def test_classify(probe, kind, count, source):
    assert detect.classify(probe) == detect.Accelerators(kind, count, source)


DCU4 = detect.Accelerators("dcu", 4, "torch")


@pytest.mark.parametrize("acc, env, ray_amd, want", [
    (detect.Accelerators("cuda", 4, "torch"), {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, False, {}),
    (detect.Accelerators("cpu", 0, "none"), {}, False, {}),
    # Ray masks with CUDA_VISIBLE_DEVICES (its ROCm SMI sees no DCU): the node's HIP mask
    # becomes a CUDA mask, or HIP's would override Ray's per-actor one
    (DCU4, {"HIP_VISIBLE_DEVICES": "4,5,6,7"}, False,
     {"HIP_VISIBLE_DEVICES": None, "CUDA_VISIBLE_DEVICES": "4,5,6,7"}),
    (DCU4, {}, False, {"HIP_VISIBLE_DEVICES": None}),
    (DCU4, {"ROCR_VISIBLE_DEVICES": "0,1,2,3"}, False, {"HIP_VISIBLE_DEVICES": None}),
    # Ray masks with HIP_VISIBLE_DEVICES (its ROCm SMI sees the devices)
    (DCU4, {"HIP_VISIBLE_DEVICES": "0,1,2,3"}, True, {}),
    (DCU4, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, True,
     {"HIP_VISIBLE_DEVICES": "0,1,2,3", "CUDA_VISIBLE_DEVICES": None}),
    (DCU4, {"ROCR_VISIBLE_DEVICES": "4,5,6,7"}, True, {"HIP_VISIBLE_DEVICES": "0,1,2,3"}),
])
def test_ray_env(acc, env, ray_amd, want):
    assert detect.ray_env(acc, env, ray_amd) == want


def test_probe_reads_the_driver_listings(tmp_path):
    kfd = tmp_path / "kfd"
    for i, (simds, vendor) in enumerate([(0, 0), (60, 0x1d94), (60, 0x1d94)]):  # a CPU agent
        (kfd / "nodes" / str(i)).mkdir(parents=True)
        (kfd / "nodes" / str(i) / "properties").write_text(
            f"cpu_cores_count 0\nsimd_count {simds}\nvendor_id {vendor}\n")
    nv = tmp_path / "nvidia"
    (nv / "0000:01:00.0").mkdir(parents=True)
    facts = detect.probe({"HIP_VISIBLE_DEVICES": "1", "PATH": "/bin"}, use_torch=False,
                         kfd_root=kfd, nvidia_root=nv)
    assert facts == P(kfd_vendors=(0x1d94, 0x1d94), nvidia_count=1,
                      env={"HIP_VISIBLE_DEVICES": "1"})
    assert detect.classify(facts) == detect.Accelerators("dcu", 1, "kfd")


def test_detect_cli_prints_json():
    out = subprocess.run([sys.executable, "-m", "cluster.detect"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out)
    assert result["kind"] in ("cuda", "rocm", "dcu", "cpu") and result["count"] >= 0


# node launcher


def test_port_plan_from_env():
    plan = node.port_plan({"OPTGPTQ_RAY_PORT": "7000", "OPTGPTQ_NODE_PORTS": "20000"})
    assert plan.ray == 7000 and plan.http == 8000 and plan.node == 20000
    assert "--node-manager-port=20000" in plan.node_flags()
    assert "--max-worker-port=20999" in plan.node_flags()
    assert plan.fixed(head=False) == {f"OPTGPTQ_NODE_PORTS+{i}": 20000 + i for i in range(6)}
    assert node.port_plan({}).node_flags() == []


@pytest.mark.parametrize("env, message", [
    ({"OPTGPTQ_RAY_PORT": "abc"}, "OPTGPTQ_RAY_PORT='abc' is not an integer"),
    ({"OPTGPTQ_HTTP_PORT": "70000"}, "OPTGPTQ_HTTP_PORT=70000 is not a port number"),
    ({"OPTGPTQ_NODE_PORTS": "65000"}, "OPTGPTQ_NODE_PORTS=65000"),
    ({"OPTGPTQ_CLIENT_PORT": "10500"}, "inside the worker processes' ports 10002-19999"),
])
def test_bad_port_plan_names_the_variable(env, message):
    with pytest.raises(node.SetupError, match=message):
        node.port_plan(env)


CPU = detect.Accelerators("cpu", 0, "none")


def test_node_shape_precedence():
    dcu = detect.Accelerators("dcu", 8, "torch")
    assert node.node_shape({"SLURM_CPUS_PER_TASK": "16"}, dcu) == (16, 8, {})
    assert node.node_shape({"SLURM_CPUS_ON_NODE": "32"}, CPU) == (32, 0, {})
    assert node.node_shape({}, CPU) == (None, 0, {})
    declared = {"OPTGPTQ_NODE_RESOURCES": '{"CPU": 4, "GPU": 2, "fast_disk": 1}',
                "SLURM_CPUS_ON_NODE": "64"}
    assert node.node_shape(declared, dcu) == (4, 2, {"fast_disk": 1})
    assert node.node_shape({**declared, "OPTGPTQ_NUM_GPUS": "1", "OPTGPTQ_NUM_CPUS": "3"},
                           dcu) == (3, 1, {"fast_disk": 1})
    with pytest.raises(node.SetupError, match="OPTGPTQ_NODE_RESOURCES is not JSON"):
        node.node_shape({"OPTGPTQ_NODE_RESOURCES": "{"}, dcu)


def test_ray_start_argv():
    plan = node.PortPlan(ray=7000, node=20000)
    head = node.ray_start_argv("head", plan, "10.0.0.1", None, 16, 4, {}, "/tmp/r", "/j/a.yaml")
    assert head[:4] == [sys.executable, "-m", "ray.scripts.scripts", "start"]
    for flag in ["--head", "--block", "--node-ip-address=10.0.0.1", "--num-gpus=4",
                 "--num-cpus=16", "--port=7000", "--autoscaling-config=/j/a.yaml",
                 "--temp-dir=/tmp/r", "--node-manager-port=20000"]:
        assert flag in head
    worker = node.ray_start_argv("worker", node.PortPlan(), "10.0.0.2", "10.0.0.1:6379", None,
                                 0, {"x": 1}, "/tmp/r")
    assert "--address=10.0.0.1:6379" in worker and "--head" not in worker
    assert '--resources={"x": 1}' in worker and not any(a.startswith("--num-cpus") for a in worker)


def _free_ports() -> dict[str, str]:
    """The head's port variables, each a port free right now (defaults may be taken here)."""
    ports = {}
    for name in ("RAY", "DASHBOARD", "CLIENT", "HTTP", "GRPC"):
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
            ports[f"OPTGPTQ_{name}_PORT"] = str(s.getsockname()[1])
    return ports


def _prepare(role: str, env: dict, **kw):
    args = Namespace(role=role, address=kw.get("address"), wait_s=kw.get("wait_s", 1))
    return node.prepare(args, env)


def test_prepare_a_worker(monkeypatch):
    monkeypatch.setattr(detect, "probe", lambda env: P(torch_count=2, torch_hip="5.7",
                                                       env={"HIP_VISIBLE_DEVICES": "2,3"}))
    monkeypatch.setattr(detect, "ray_sees_amd", lambda: False)
    with socket.socket() as server:  # a stand-in head that accepts connections
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        env = {"HIP_VISIBLE_DEVICES": "2,3", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "OPTGPTQ_NODE_TYPE": "gpu_worker", "SLURM_JOB_ID": "77",
               "SLURM_CPUS_ON_NODE": "8"}
        argv, child = _prepare("worker", env, address=address)
    assert f"--address={address}" in argv and "--num-gpus=2" in argv and "--num-cpus=8" in argv
    assert child["CUDA_VISIBLE_DEVICES"] == "2,3" and "HIP_VISIBLE_DEVICES" not in child
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in child
    assert child["RAY_CLOUD_INSTANCE_ID"] == "77" and child["RAY_NODE_TYPE_NAME"] == "gpu_worker"


def test_prepare_refuses_a_port_in_use():
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(node.SetupError, match=rf"port\(s\) in use on .*: {port} "
                                                  r"\(OPTGPTQ_HTTP_PORT\)"):
            _prepare("head", {**_free_ports(), "OPTGPTQ_HTTP_PORT": str(port)})


def test_prepare_names_a_bad_autoscaler_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: x\nprovider: {type: aws}\n")
    with pytest.raises(node.SetupError, match=rf"OPTGPTQ_AUTOSCALER={bad}: autoscaler config: "
                                              "provider: want type: external"):
        _prepare("head", {**_free_ports(), "OPTGPTQ_AUTOSCALER": str(bad),
                          "OPTGPTQ_JOB_DIR": str(tmp_path)})


def test_prepare_worker_without_head():
    with pytest.raises(node.SetupError, match="no head address"):
        _prepare("worker", {})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(node.SetupError, match=f"Ray head at 127.0.0.1:{free} is not reachable"):
        _prepare("worker", {}, address=f"127.0.0.1:{free}", wait_s=0)


def test_missing_ray_is_named(tmp_path):
    venv.create(tmp_path / "noray", with_pip=False)  # a Python without Ray
    python = tmp_path / "noray" / "bin" / "python"
    done = subprocess.run([str(python), "-m", "cluster.node", "head"], cwd=ROOT,
                          capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert done.returncode == 2
    assert f"Ray is not installed for {python}" in done.stderr


# autoscaler YAML


def test_shipped_autoscaler_yaml_checks_and_renders(tmp_path):
    config = autoscaler_config.load(ROOT / "cluster" / "autoscaler.yaml")
    assert autoscaler_config.max_autoscaled_gpus(config) == 8  # 2 jobs x 4 GPUs
    path, rendered = autoscaler_config.render(
        ROOT / "cluster" / "autoscaler.yaml", "10.0.0.1:6379",
        {"SLURM_JOB_ID": "42", "OPTGPTQ_JOB_DIR": str(tmp_path)})
    assert path == tmp_path / "autoscaler.yaml"
    assert yaml.safe_load(path.read_text()) == rendered
    assert rendered["cluster_name"] == "optgptq-42" and rendered["setup_commands"] == []
    assert rendered["provider"]["head_address"] == "10.0.0.1:6379"
    assert rendered["provider"]["head_id"] == "42-head"
    assert rendered["provider"]["log_dir"] == str(tmp_path)


def test_max_autoscaled_gpus_respects_the_global_cap():
    types = {"head": {"resources": {}, "node_config": {}},
             "big": {"resources": {"CPU": 8, "GPU": 8}, "max_workers": 2, "node_config": {}},
             "small": {"resources": {"CPU": 8, "GPU": 2}, "max_workers": 5, "node_config": {}},
             "cpu": {"resources": {"CPU": 8}, "max_workers": 9, "node_config": {}}}
    config = {"head_node_type": "head", "available_node_types": types}
    assert autoscaler_config.max_autoscaled_gpus(config) == 2 * 8 + 5 * 2
    assert autoscaler_config.max_autoscaled_gpus({**config, "max_workers": 3}) == 2 * 8 + 2


def _yaml():
    return yaml.safe_load((ROOT / "cluster" / "autoscaler.yaml").read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["provider"].update(module="x.Y"), "provider: want type: external"),
    (lambda c: c["provider"].update(disable_node_updaters=False), "disable_node_updaters"),
    (lambda c: c.update(head_node_type="nope"), "head_node_type must name one of"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(resources={"GPU": 4}),
     r"available_node_types.gpu_worker.resources must declare the node's CPU"),
    (lambda c: c["available_node_types"]["gpu_worker"]["node_config"].update(sbatch_args="-N1"),
     r"gpu_worker.node_config.sbatch_args must be a list of strings"),
    (lambda c: c["available_node_types"].pop("gpu_worker"), "no worker node types"),
])
def test_bad_autoscaler_yaml_names_the_field(edit, message):
    config = _yaml()
    edit(config)
    with pytest.raises(ValueError, match=message):
        autoscaler_config.check(config)


# Slurm provider (parsing; the real sbatch/squeue/scancel are in test_slurm.py)


def test_parse_squeue():
    tags = {"ray-node-kind": "worker", "ray-user-node-type": "gpu_worker"}
    text = (f"101 RUNNING gpu07 {json.dumps(tags, separators=(',', ':'))}\n"
            "102 PENDING  \n103 RUNNING gpu08 not-json\n\n")
    from cluster.slurm_provider import Job, parse_squeue

    assert parse_squeue(text) == [Job("101", "RUNNING", "gpu07", tags),
                                  Job("102", "PENDING", "", {}),
                                  Job("103", "RUNNING", "gpu08", {})]


def test_sbatch_argv():
    from cluster.slurm_provider import sbatch_argv

    argv = sbatch_argv("optgptq-42", {"a": "b"}, "/logs", ["--account=x"], ["--gres=gpu:4"],
                       "/repo/cluster/slurm/worker.sbatch")
    assert argv == ["sbatch", "--parsable", "--job-name=optgptq-42", '--comment={"a":"b"}',
                    "--output=/logs/%x-%j.out", "--account=x", "--gres=gpu:4",
                    "/repo/cluster/slurm/worker.sbatch"]


def test_provider_needs_disabled_updaters():
    from cluster.slurm_provider import SlurmNodeProvider

    with pytest.raises(ValueError, match="disable_node_updaters must be true"):
        SlurmNodeProvider({}, "c")


# the Serve config written for a cluster


def _shipped_replicas():
    config = yaml.safe_load((ROOT / "deployments" / "optgptq.yaml").read_text())
    return config, config["applications"][0]["args"]["replicas"]


def test_one_replica_per_accelerator():
    _, replicas = _shipped_replicas()
    fixed = deploy.plan_replicas(replicas, 8, 8)
    assert fixed["num_replicas"] == 8 and fixed["num_gpus"] == 1
    assert "autoscaling_config" not in fixed and fixed["max_queued_requests"] == 64
    grow = deploy.plan_replicas(replicas, 4, 12)
    auto = grow["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (4, 12) and "num_replicas" not in grow
    assert auto["policy"] == replicas["autoscaling_config"]["policy"]  # the YAML's policy stays
    assert deploy.plan_replicas(replicas, 0, 8)["autoscaling_config"]["min_replicas"] == 1
    assert deploy.plan_replicas(replicas, 0, 0) == replicas  # CPU cluster: the YAML as is
    assert deploy.plan_replicas({"num_replicas": 2, "autoscaling_config": {
        "initial_replicas": 1}}, 2, 6)["autoscaling_config"]["initial_replicas"] == 2


def test_render_serve_config_validates_against_the_app(monkeypatch, tmp_path):
    from deployments.app import parse_config

    base, replicas = _shipped_replicas()
    out = deploy.render_serve_config(base, 4, 4, "0.0.0.0", 8100, 9100)
    monkeypatch.delenv("OPTGPTQ_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="set API keys"):  # every interface, no keys
        parse_config(out["applications"][0]["args"])
    keys = tmp_path / "keys"
    keys.write_text("# tenant a\nsk-0123456789abcdef a\n")
    out = deploy.render_serve_config(base, 4, 4, "0.0.0.0", 8100, 9100, str(keys))
    config = parse_config(out["applications"][0]["args"])
    assert config.ingress.api_keys_file == str(keys)
    assert (config.ingress.host, config.ingress.http_port, config.ingress.grpc_port) == (
        "0.0.0.0", 8100, 9100)
    assert config.replicas.num_replicas == 4 and config.replicas.num_gpus == 1
    assert base["applications"][0]["args"]["replicas"] == replicas  # input left unchanged
    base["applications"][0]["args"]["engine"]["device"] = "cpu"  # an app pinned to the CPU
    pinned = deploy.render_serve_config(base, 4, 4, "0.0.0.0", 8100, 9100)
    assert pinned["applications"][0]["args"]["replicas"] == replicas
    with pytest.raises(ValueError, match="applications"):
        deploy.render_serve_config({}, 1, 1, "h", 1, 2)


class _FakeRay:
    def __init__(self, addresses):
        self.addresses = addresses

    def nodes(self):
        return [{"Alive": True, "NodeManagerAddress": a} for a in self.addresses] + \
            [{"Alive": False, "NodeManagerAddress": "10.0.0.9"}]


def test_waiting_for_nodes_that_never_join_names_those_seen():
    assert len(deploy.wait_for_nodes(_FakeRay(["10.0.0.1", "10.0.0.2"]), 2, 0)) == 2
    with pytest.raises(deploy.DeployError, match=r"1 of 2 Ray nodes joined within 0 s "
                                                 r"\(seen: 10.0.0.1\)"):
        deploy.wait_for_nodes(_FakeRay(["10.0.0.1"]), 2, 0)


class _FakeServe:
    def __init__(self, status, message=""):
        app = Namespace(status=status, message=message)
        self.result = Namespace(applications={"optgptq": app})

    def status(self):
        return self.result


def test_waiting_for_the_app_reports_a_failed_deploy():
    deploy.wait_running(_FakeServe("ApplicationStatus.RUNNING"), "optgptq", 0)
    with pytest.raises(deploy.DeployError, match="failed to deploy: model: no such folder"):
        deploy.wait_running(_FakeServe("DEPLOY_FAILED", "model: no such folder"), "optgptq", 0)
    with pytest.raises(deploy.DeployError, match="not running after 0 s"):
        deploy.wait_running(_FakeServe("DEPLOYING"), "optgptq", 0)


# the batch script


def test_batch_script_needs_an_allocation():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", "cluster/slurm/optgptq.sbatch"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "no Slurm allocation" in done.stderr
