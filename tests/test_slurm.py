"""The Slurm tier: a real Slurm on this machine (cluster/slurm/localhost.sh: munged, slurmctld and
two slurmd, nodes n1 and n2 on 127.0.0.1, installed with apt where missing).

- the node provider's create / list / terminate through real sbatch / squeue / scancel, and a
  worker job that dies is no longer listed;
- the batch script refuses bad configuration with a clear message (a port in use, no Ray, the
  latter inside salloc);
- the batch script brings Ray up on two nodes, deploys a tiny model, the app answers HTTP, a
  worker that dies is reported, scancel stops everything;
- node autoscaling end to end: a replica that does not fit on the head makes Ray's autoscaler
  submit a worker job through the provider; once the app is gone the idle worker job is
  cancelled.

Every Ray here runs inside Slurm jobs and is stopped by cancelling them (never `ray stop`, which
would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import venv
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "cluster" / "slurm" / "optgptq.sbatch"


@pytest.fixture(scope="module")
def slurm():
    state = Path(tempfile.mkdtemp(prefix="slurm", dir="/tmp"))
    script = str(ROOT / "cluster/slurm/localhost.sh")
    try:
        done = subprocess.run(["bash", script, "start", str(state)], capture_output=True,
                              text=True, timeout=900)
        if done.returncode == 3:
            pytest.skip(done.stderr.strip())
        assert done.returncode == 0, done.stderr
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))
               and k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        env["SLURM_CONF"] = str(state / "slurm.conf")
        daemons = [int(f.read_text()) for f in state.glob("*.pid")]
        yield env
    finally:
        subprocess.run(["bash", script, "stop", str(state)], timeout=180)
    for pid in daemons:  # whatever `stop` could not reach (e.g. its pid files went missing)
        try:
            if str(state) in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _squeue(env) -> dict[str, str]:
    out = subprocess.run(["squeue", "--noheader", "--format=%i %T"], env=env, check=True,
                         capture_output=True, text=True).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def _until(check, timeout_s: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def _job_env(slurm, tmp_path: Path, **extra) -> dict[str, str]:
    ports = {k: str(_free_port()) for k in ("OPTGPTQ_RAY_PORT", "OPTGPTQ_DASHBOARD_PORT",
                                             "OPTGPTQ_CLIENT_PORT", "OPTGPTQ_HTTP_PORT",
                                             "OPTGPTQ_GRPC_PORT")}
    return {**slurm, **ports, "OPTGPTQ_PYTHON": sys.executable, "OPTGPTQ_REPO": str(ROOT),
            "OPTGPTQ_JOB_DIR": str(tmp_path / "job"), "OPTGPTQ_HTTP_HOST": "127.0.0.1",
            "OPTGPTQ_TEMP_DIR": tempfile.mkdtemp(prefix="ray", dir="/tmp"),
            "OPTGPTQ_WAIT_S": "240", "OPTGPTQ_NUM_GPUS": "0", **extra}  # CPU replicas everywhere


def _sbatch(env, out: Path, *args: str) -> str:
    done = subprocess.run(["sbatch", "--parsable", f"--output={out}", *args, str(SCRIPT)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def _sbatch_wait(env, out: Path, *args: str) -> int:
    """Run the batch script to its end; its exit status."""
    done = subprocess.run(["sbatch", "--wait", f"--output={out}", *args, str(SCRIPT)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "Submitted batch job" in done.stdout, done.stderr
    return done.returncode


def _serve_config(tiny: Path, path: Path, replicas: dict) -> Path:
    config = yaml.safe_load((ROOT / "deployments" / "optgptq.yaml").read_text())
    args = config["applications"][0]["args"]
    args.update(model=str(tiny), served_model_name="tiny",
                engine={"device": "cpu", "num_blocks": 64, "max_num_seqs": 8},
                replicas={"max_ongoing_requests": 4, **replicas})
    path.write_text(yaml.safe_dump(config))
    return path


def _complete(port: int) -> dict:
    body = json.dumps({"model": "tiny", "prompt": "paged cache", "max_tokens": 4,
                       "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def _answers(port: int):
    try:
        return _complete(port)
    except OSError:
        return None


def _ray_processes(temp_dir: str) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


# the node provider


def test_provider_creates_lists_and_terminates_jobs(slurm, tmp_path, monkeypatch):
    from ray.autoscaler.node_launch_exception import NodeLaunchException
    from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE

    from cluster.slurm_provider import SlurmNodeProvider

    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    script = tmp_path / "worker.sh"
    script.write_text("#!/bin/bash\n"
                      'echo "head=$OPTGPTQ_HEAD_ADDRESS type=$OPTGPTQ_NODE_TYPE '
                      'resources=$OPTGPTQ_NODE_RESOURCES"\nsleep 300\n')
    provider = SlurmNodeProvider({"disable_node_updaters": True, "worker_script": str(script),
                                  "log_dir": str(tmp_path), "head_address": "10.1.2.3:6379",
                                  "head_id": "7-head", "head_node_type": "head"}, "ptest-7")
    tags = {TAG_RAY_NODE_KIND: "worker", TAG_RAY_USER_NODE_TYPE: "cpu_worker"}
    created = provider.create_node_with_resources_and_labels(
        {"sbatch_args": ["--cpus-per-task=1"]}, tags, 2, {"CPU": 1}, {})
    ids = sorted(created)
    assert len(ids) == 2
    assert sorted(provider.non_terminated_nodes({TAG_RAY_NODE_KIND: "worker"})) == ids
    _until(lambda: provider.non_terminated_nodes({}) and all(provider.is_running(i) for i in ids),
           60, "both worker jobs running")
    assert provider.node_tags(ids[0]) == tags
    assert provider.internal_ip(ids[0])  # the node's address, resolved from its name
    assert provider.non_terminated_nodes({TAG_RAY_NODE_KIND: "head"}) == ["7-head"]
    log = tmp_path / f"ptest-7-{ids[0]}.out"
    _until(lambda: log.exists() and "head=" in log.read_text(), 30, "the job's output")
    assert log.read_text().split("\n")[0] == \
        'head=10.1.2.3:6379 type=cpu_worker resources={"CPU": 1}'

    provider.set_node_tags(ids[0], {"ray-node-status": "up-to-date"})
    provider.non_terminated_nodes({})
    assert provider.node_tags(ids[0])["ray-node-status"] == "up-to-date"

    # a job that dies (cancelled from outside here) is noticed: no longer listed
    subprocess.run(["scancel", ids[1]], env=slurm, check=True)
    _until(lambda: ids[1] not in provider.non_terminated_nodes({}), 30, "the dead job gone")
    assert provider.is_terminated(ids[1]) and not provider.is_running(ids[1])

    provider.terminate_nodes([ids[0], "7-head"])  # the head is never cancelled from here
    assert provider.non_terminated_nodes({}) == ["7-head"]
    _until(lambda: ids[0] not in _squeue(slurm), 30, "the cancelled job gone")

    with pytest.raises(NodeLaunchException, match="invalid partition"):
        provider.create_node({"sbatch_args": ["--partition=nope"]}, tags, 1)


# the batch script


def test_batch_script_refuses_a_port_in_use(slurm, tmp_path):
    env = _job_env(slurm, tmp_path)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", int(env["OPTGPTQ_RAY_PORT"])))
        taken.listen()
        out = tmp_path / "job.out"
        assert _sbatch_wait(env, out, "--nodes=1", "--cpus-per-task=1") == 2
    text = out.read_text()
    assert f"port(s) in use on n1: {env['OPTGPTQ_RAY_PORT']} (OPTGPTQ_RAY_PORT)" in text
    assert "the head's checks failed on n1" in text


def test_batch_script_names_missing_ray_inside_salloc(slurm, tmp_path):
    # inside salloc the script runs off the nodes: its head-side commands go through srun
    venv.create(tmp_path / "noray", with_pip=False)
    python = tmp_path / "noray" / "bin" / "python"
    done = subprocess.run(["salloc", "--nodes=1", "--cpus-per-task=1", "bash", str(SCRIPT)],
                          env=_job_env(slurm, tmp_path, OPTGPTQ_PYTHON=str(python)), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"Ray is not installed for {python}" in done.stderr
    assert "the head's checks failed on n1" in done.stderr


def test_batch_script_serves_on_two_nodes(slurm, tmp_path, tiny_models):
    config = _serve_config(tiny_models["llama-gqa"], tmp_path / "serve.yaml",
                           {"num_replicas": 2, "num_cpus": 0.5})
    env = _job_env(slurm, tmp_path, OPTGPTQ_CONFIG=str(config))
    out = tmp_path / "job.out"
    # 2 CPUs a node: the head alone still holds both replicas and the ingress
    job = _sbatch(env, out, "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2")
    try:
        _until(lambda: out.exists() and ("serving;" in out.read_text()
                                         or job not in _squeue(slurm)), 300, "serving", out)
        text = out.read_text()
        assert "serving;" in text, text[-4000:]
        assert "optgptq deploy: 2 node(s), 0 accelerator(s)" in text
        port = int(env["OPTGPTQ_HTTP_PORT"])
        answer = _complete(port)
        assert answer["model"] == "tiny" and answer["usage"]["completion_tokens"] == 4
        rendered = yaml.safe_load((tmp_path / "job" / "serve.yaml").read_text())
        ingress = rendered["applications"][0]["args"]["ingress"]
        assert (ingress["host"], ingress["http_port"]) == ("127.0.0.1", port)

        # the worker dies: reported, and the head keeps serving
        subprocess.run(["scancel", f"{job}.1"], env=slurm, check=True)
        _until(lambda: "the Ray worker on n2 exited" in out.read_text(), 60,
               "the dead worker reported", out)
        assert _until(lambda: _answers(port), 120, "an answer after the worker died", out)

        # SIGTERM to the batch script (as at the time limit): Serve drains, Ray stops
        subprocess.run(["scancel", "--batch", "--signal=TERM", job], env=slurm, check=True)
        _until(lambda: job not in _squeue(slurm), 90, "the job's end", out)
    finally:
        subprocess.run(["scancel", job], env=slurm)
    text = out.read_text()
    assert "optgptq: stopping" in text and "Serve shut down" in text
    assert "optgptq: stopped" in text
    _until(lambda: not _ray_processes(env["OPTGPTQ_TEMP_DIR"]), 60, "Ray's processes gone", out)


def test_node_autoscaling_through_slurm(slurm, tmp_path, tiny_models):
    auto = yaml.safe_load((ROOT / "cluster" / "autoscaler.yaml").read_text())
    auto.update(cluster_name="optgptq-test", max_workers=1, idle_timeout_minutes=0.25)
    auto["available_node_types"] = {
        "head": auto["available_node_types"]["head"],
        "cpu_worker": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 1,
                       "node_config": {"sbatch_args": ["--nodes=1", "--cpus-per-task=2"]}}}
    (tmp_path / "autoscaler.yaml").write_text(yaml.safe_dump(auto))
    # two replicas of 1.5 CPUs each (the ingress reserves none): the head's 2 CPUs hold one
    config = _serve_config(tiny_models["llama-gqa"], tmp_path / "serve.yaml",
                           {"num_replicas": 2, "num_cpus": 1.5})
    env = _job_env(slurm, tmp_path, OPTGPTQ_CONFIG=str(config),
                   OPTGPTQ_AUTOSCALER=str(tmp_path / "autoscaler.yaml"))
    out = tmp_path / "job.out"
    job = _sbatch(env, out, "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2")
    try:
        _until(lambda: out.exists() and ("serving;" in out.read_text()
                                         or job not in _squeue(slurm)), 300, "serving", out)
        assert "serving;" in out.read_text(), out.read_text()[-4000:]
        workers = [j for j in _squeue(slurm) if j != job]
        assert len(workers) == 1, "the autoscaler submitted one worker job"
        worker_log = tmp_path / "job" / f"optgptq-test-{job}-{workers[0]}.out"
        assert "optgptq node: worker n2" in worker_log.read_text()
        assert _complete(int(env["OPTGPTQ_HTTP_PORT"]))["usage"]["completion_tokens"] == 4

        # no more demand: the idle worker job is cancelled after the idle timeout
        driver = ("import ray, sys; from ray import serve; "
                  "ray.init(address=sys.argv[1], namespace='serve', logging_level='ERROR'); "
                  "serve.delete('optgptq')")
        head = out.read_text().split("head n1 at ")[1].split(",")[0]
        token = (tmp_path / "job" / "ray_token").read_text().strip()  # the job's own token
        subprocess.run([sys.executable, "-c", driver, head], check=True, timeout=120,
                       env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        _until(lambda: workers[0] not in _squeue(slurm), 180, "the idle worker job cancelled",
               out)
    finally:
        subprocess.run(["scancel", job], env=slurm)
    _until(lambda: not _squeue(slurm), 60, "every job's end", out)
