"""Offline batch throughput on CPU: optgptq vs Hugging Face transformers vs vLLM-CPU.

Workload: ``--num-requests`` (default 64) requests drawn with ``random.Random(--seed)``; for each
request, in order, a prompt length uniform in [16, 512] tokens, a ``max_tokens`` uniform in
[16, 256] and an offset into a corpus. The corpus is the fixed English paragraph ``TEXT`` below,
tokenized and repeated; a prompt is a short unique tag ("Passage 7.") followed by the corpus slice
at its offset, exactly its drawn length. The tag makes every prompt's first KV block distinct, so
no engine gets cross-request prefix-cache hits from the repeated text. Decoding is greedy
(temperature 0) with EOS ignored, so every request yields exactly ``max_tokens`` tokens in every
engine. Model: ``--model`` (default ``smollm2``, SmolLM2-135M-Instruct), float32 weights.

Method: each engine runs in its own subprocess (this script re-invoked with ``--child``), so load
time, memory and thread pools never mix. The child loads the model, runs one tiny warm-up
generate, then times a single pass over all requests (wall clock; model load and warm-up are not
timed). A fresh child per pass, so no engine's prefix cache carries one pass into the next.

Rounds: the machine's own speed drifts (on this workplace's 2-core VM the same engine and code
moved 185-242 output tok/s between consecutive one-minute passes, sgemm 262-352 GFLOP/s), which
one pass per engine cannot tell from a difference between engines. So optgptq and vLLM-CPU run
``--rounds`` times (default 3), interleaved, the order reversed every other round
(optgptq, vLLM; vLLM, optgptq; ...), and transformers ``--hf-rounds`` times (default 1, after
the first round's pair: its ratio is far from its target, and one of its passes takes four
minutes). Each engine's figures are the median over its passes; the vLLM target is the median
of the per-round ratios optgptq / vLLM (passes minutes apart, so both see the machine in about
the same state), with every round's ratio listed beside it.

Peak RSS is the largest of the child's own ``ru_maxrss`` and a 0.5 s sampled sum of RSS
over the child's process tree (vLLM runs its engine core and worker as child processes; the sum
counts pages they share, e.g. library code, once per process; PSS is not sampled because reading
smaps of a multi-GB process every half second steals CPU from the engine). Each engine's KV pool counts:
optgptq's CPU default is 2 GiB, vLLM's is set by ``--vllm-kv-gib`` (default 4).

- optgptq: ``LLM.generate`` with every request submitted at once (continuous batching,
  max_num_seqs=64, max_num_batched_tokens=1024).
- transformers: ``model.generate`` over left-padded batches of ``--hf-batch-size`` requests in
  submission order, ``do_sample=False``, ``eos_token_id=None``; each batch runs to the largest
  ``max_tokens`` in it (what one generate call per batch does). Output tokens counted are only
  those each request asked for, ``min(max_tokens, generated)``; the surplus is wasted work that
  stays in the elapsed time.
- vLLM-CPU: ``vllm.LLM.generate`` with token prompts, max_num_seqs=64, vLLM's other defaults, run
  by ``--vllm-python`` (default ``$OPTGPTQ_VLLM_PYTHON``, else this interpreter if it can import
  vllm, else skipped). Its OpenMP threads are bound to all allowed CPUs (``--vllm-omp-bind``;
  vLLM's ``auto`` reserves one core for its scheduler, half of a 2-core machine).

Throughput: output tok/s = output tokens / elapsed; total tok/s adds prompt tokens. Greedy token
agreement with optgptq (fraction of identical requests, first passes) is reported for
information only; every later pass of an engine must give its first pass's tokens.
Results go to ``--out`` (default bench/results/throughput-cpu.json), written atomically.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ENGINES = ("optgptq", "transformers", "vllm")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "throughput-cpu.json"
TEXT = """\
The harbour town woke slowly in winter. Before the light came over the hills, the bakers had
already opened their shutters, and the smell of bread drifted down to the quay where fishermen
argued about the weather and mended their nets by lantern light. Children ran along the sea wall
on their way to school, counting the gulls and daring each other to step closer to the edge.
In the library above the post office, an old clerk sorted letters that had waited years for an
answer, and wrote careful notes in the margins of ledgers nobody else would read. By noon the
market square was full of voices: farmers selling apples and cheese, a tinker sharpening knives,
travellers asking the way to the lighthouse. When the tide turned in the evening, the boats came
home one by one, and the town gathered to hear what the sea had given and what it had kept.
"""


def version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def make_workload(args: argparse.Namespace, model_path: Path) -> dict:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_path))
    para = tok.encode(" ".join(TEXT.split()) + " ", add_special_tokens=False)
    corpus = para * (600 // len(para) + 2)
    rng = random.Random(args.seed)
    prompts, max_tokens = [], []
    for i in range(args.num_requests):
        plen, mtok = rng.randint(16, 512), rng.randint(16, 256)
        tag = tok.encode(f"Passage {i}.", add_special_tokens=False)
        off = rng.randrange(len(para))
        prompts.append(tag + corpus[off:off + plen - len(tag)])
        max_tokens.append(mtok)
    return {"model": args.model, "model_path": str(model_path), "prompts": prompts,
            "max_tokens": max_tokens, "hf_batch_size": args.hf_batch_size,
            "vllm_enforce_eager": args.vllm_enforce_eager}


# ---------------------------------------------------------------- children (one engine each)

def run_optgptq(w: dict) -> tuple[list[list[int]], float, dict]:
    from optgptq.engine.llm import LLM
    from optgptq.engine.sampling_params import SamplingParams
    llm = LLM(w["model"], max_num_seqs=64, max_num_batched_tokens=1024)
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in w["max_tokens"]]
    t0 = time.perf_counter()
    outs = llm.generate(w["prompts"], params)
    elapsed = time.perf_counter() - t0
    return [list(o.token_ids) for o in outs], elapsed, {"optgptq": version("optgptq")}


def run_transformers(w: dict) -> tuple[list[list[int]], float, dict]:
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(w["model_path"], dtype=torch.float32).eval()
    gc = model.generation_config
    pad = gc.pad_token_id if gc.pad_token_id is not None else gc.eos_token_id
    gc.eos_token_id, gc.pad_token_id, gc.do_sample = None, pad, False  # greedy, EOS ignored

    def generate(prompts: list[list[int]], new: int) -> list[list[int]]:
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc,
                                 max_new_tokens=new)
        return out[:, width:].tolist()

    generate([[1, 2, 3, 4]], 2)
    bs, tokens = w["hf_batch_size"], []
    t0 = time.perf_counter()
    for s in range(0, len(w["prompts"]), bs):
        caps = w["max_tokens"][s:s + bs]
        gen = generate(w["prompts"][s:s + bs], max(caps))
        tokens += [g[:m] for g, m in zip(gen, caps)]
    elapsed = time.perf_counter() - t0
    return tokens, elapsed, {"torch_threads": torch.get_num_threads()}


def run_vllm(w: dict) -> tuple[list[list[int]], float, dict]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(model=w["model_path"], dtype="float32", max_num_seqs=64,
              enforce_eager=w["vllm_enforce_eager"])
    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3, 4])],
                 SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), use_tqdm=False)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in w["prompts"]]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in w["max_tokens"]]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU")}
    return [list(o.outputs[0].token_ids) for o in outs], elapsed, {"vllm": version("vllm-cpu") or
                                                                   version("vllm"), "env": env}


def child(engine: str, workload: Path, out: Path) -> None:
    import psutil
    peak = {"rss": 0}
    stop = threading.Event()

    def sample() -> None:
        # RSS only: reading PSS walks /proc/*/smaps, which costs real CPU on a 2-core machine
        me = psutil.Process()
        while not stop.wait(0.5):
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak["rss"] = max(peak["rss"], total)

    threading.Thread(target=sample, daemon=True).start()
    w = json.loads(workload.read_text())
    tokens, elapsed, extra = {"optgptq": run_optgptq, "transformers": run_transformers,
                              "vllm": run_vllm}[engine](w)
    stop.set()
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.write_text(json.dumps({
        "engine": engine, "elapsed_s": elapsed, "token_ids": tokens,
        "output_tokens": sum(map(len, tokens)), "prompt_tokens": sum(map(len, w["prompts"])),
        "peak_rss_bytes": max(self_rss, peak["rss"]), "peak_rss_self_bytes": self_rss,
        "python": sys.executable, "torch": version("torch"), **extra}))


# ---------------------------------------------------------------- parent

def vllm_python(arg: str | None) -> str | None:
    if arg or os.environ.get("OPTGPTQ_VLLM_PYTHON"):
        return arg or os.environ["OPTGPTQ_VLLM_PYTHON"]
    return sys.executable if importlib.util.find_spec("vllm") else None


def launch(engine: str, python: str, wpath: Path, tmp: Path, args: argparse.Namespace,
           round_: int) -> dict:
    out, log = tmp / f"{engine}-{round_}.json", tmp / f"{engine}-{round_}.log"
    env = dict(os.environ)
    if engine == "vllm":
        bind = args.vllm_omp_bind
        if bind == "all":
            bind = ",".join(map(str, sorted(os.sched_getaffinity(0))))
        env.update(VLLM_CPU_KVCACHE_SPACE=str(args.vllm_kv_gib), VLLM_CPU_OMP_THREADS_BIND=bind)
    cmd = [python, str(Path(__file__).resolve()), "--child", engine, "--workload", str(wpath),
           "--out", str(out)]
    print(f"[{engine}] pass {round_ + 1} ({python}) ...", flush=True)
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not out.is_file():
        tail = log.read_text(errors="replace").splitlines()[-30:]
        print(f"[{engine}] FAILED (exit {rc}):\n  " + "\n  ".join(tail), flush=True)
        return {"engine": engine, "error": f"exit {rc}", "log_tail": tail}
    r = json.loads(out.read_text())
    r.update(output_tok_s=r["output_tokens"] / r["elapsed_s"],
             total_tok_s=(r["output_tokens"] + r["prompt_tokens"]) / r["elapsed_s"],
             req_s=len(r["token_ids"]) / r["elapsed_s"])
    print(f"[{engine}] pass {round_ + 1}: {r['output_tok_s']:.1f} output tok/s", flush=True)
    return r


def summarize(runs: list[dict]) -> dict:
    """One engine's passes: medians of the rates, the largest peak RSS, every pass listed. A pass
    that failed, or whose tokens differ from the first pass's, makes the whole engine an error."""
    if bad := next((r for r in runs if "error" in r), None):
        return bad
    if any(r["token_ids"] != runs[0]["token_ids"] for r in runs[1:]):
        return {"engine": runs[0]["engine"], "error": "passes gave different tokens"}
    keys = ("elapsed_s", "output_tok_s", "total_tok_s", "req_s")
    return {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in keys},
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
            "runs": [{k: r[k] for k in (*keys, "peak_rss_bytes")} for r in runs]}


def paired_ratios(ours: list[dict], theirs: list[dict]) -> list[float]:
    """optgptq / vLLM output tok/s of the passes of each round (both must have succeeded)."""
    return [a["output_tok_s"] / b["output_tok_s"] for a, b in zip(ours, theirs)
            if "error" not in a and "error" not in b]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Fraction of requests with identical tokens, and mean fraction before the first divergence."""
    def prefix(x: list[int], y: list[int]) -> int:
        return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    frac = [prefix(x, y) / max(len(x), 1) for x, y in zip(a, b)]
    return {"identical_fraction": sum(x == y for x, y in zip(a, b)) / len(a),
            "mean_matching_prefix_fraction": sum(frac) / len(a)}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma list, default: all")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="passes of optgptq and vLLM each")
    ap.add_argument("--hf-rounds", type=int, default=1, help="passes of transformers")
    ap.add_argument("--vllm-python", default=None)
    ap.add_argument("--vllm-kv-gib", type=int, default=4)
    ap.add_argument("--vllm-omp-bind", default="all", help="'all' allowed CPUs, 'auto', or a list")
    ap.add_argument("--vllm-enforce-eager", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--workload", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.workload, args.out)

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := set(engines) - set(ENGINES):
        ap.error(f"unknown engine(s): {', '.join(sorted(unknown))}")
    if args.rounds < 1 or args.hf_rounds < 1:
        ap.error("--rounds and --hf-rounds must be at least 1")
    from optgptq.models.hub import resolve_model
    w = make_workload(args, resolve_model(args.model))
    pythons = {e: sys.executable for e in engines}
    notes = []
    if "vllm" in engines:
        pythons["vllm"] = vllm_python(args.vllm_python)
    if "vllm" in engines and not pythons["vllm"]:
        notes.append("vLLM skipped: no --vllm-python, no $OPTGPTQ_VLLM_PYTHON, and this "
                     "interpreter cannot import vllm")
        print(notes[-1])
        engines.remove("vllm")
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    rounds = {e: args.hf_rounds if e == "transformers" else args.rounds for e in engines}
    with tempfile.TemporaryDirectory(prefix="optgptq-bench-") as tmp:
        wpath = Path(tmp) / "workload.json"
        wpath.write_text(json.dumps(w))
        pair = [e for e in ("optgptq", "vllm") if e in engines]
        rest = [e for e in engines if e not in pair]
        for r in range(max(rounds.values())):
            for e in (pair if r % 2 == 0 else pair[::-1]) + rest:
                if r < rounds[e]:
                    runs[e].append(launch(e, pythons[e], wpath, Path(tmp), args, r))
    results = {e: summarize(rs) for e, rs in runs.items()}
    ok = {e: r for e, r in results.items() if "error" not in r}

    hf = ok.get("transformers", {}).get("output_tok_s")
    print(f"\n{'engine':<13}{'passes':>7}{'out tok/s':>11}{'total tok/s':>13}{'req/s':>8}"
          f"{'peak RSS MiB':>14}{'vs HF':>8}")
    for e, r in ok.items():
        ratio = f"{r['output_tok_s'] / hf:.2f}x" if hf else "-"
        print(f"{e:<13}{len(r['runs']):>7}{r['output_tok_s']:>11.1f}{r['total_tok_s']:>13.1f}"
              f"{r['req_s']:>8.2f}{r['peak_rss_bytes'] / 2**20:>14.0f}{ratio:>8}")

    agree = {f"optgptq_vs_{e}": agreement(ok["optgptq"]["token_ids"], ok[e]["token_ids"])
             for e in ok if e != "optgptq" and "optgptq" in ok}
    for k, v in agree.items():
        print(f"{k}: identical {v['identical_fraction']:.2f}, "
              f"matching prefix {v['mean_matching_prefix_fraction']:.2f}")
    paired = paired_ratios(runs.get("optgptq", []), runs.get("vllm", []))
    if paired:
        print("optgptq / vLLM by round: " + ", ".join(f"{x:.2f}" for x in paired))

    def target(name: str, other: str, goal: float) -> dict:
        value = None
        if other == "vllm" and paired:
            value = statistics.median(paired)
        elif "optgptq" in ok and other in ok:
            value = ok["optgptq"]["output_tok_s"] / ok[other]["output_tok_s"]
        t = {"name": name, "value": value, "target": goal, "better": "higher",
             "met": value is not None and value >= goal}
        if value is None:
            t["note"] = f"not measured: optgptq and {other} did not both run"
        return t

    pl, mt = [len(p) for p in w["prompts"]], w["max_tokens"]
    report = {
        "machine": machine(),
        "versions": {"python": platform.python_version(), "torch": version("torch"),
                     "transformers": version("transformers"), "optgptq": version("optgptq"),
                     **({"vllm": ok["vllm"].get("vllm"), "vllm_torch": ok["vllm"].get("torch")}
                        if "vllm" in ok else {})},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.orig_argv),
        "results": {
            "workload": {"num_requests": len(pl), "seed": args.seed, "model": args.model,
                         "prompt_tokens": sum(pl), "output_tokens": sum(mt),
                         "prompt_len_range": [16, 512], "max_tokens_range": [16, 256],
                         "greedy": True, "ignore_eos": True, "hf_batch_size": args.hf_batch_size},
            "engines": {e: {k: v for k, v in r.items() if k != "token_ids"}
                        for e, r in results.items()},
            "optgptq_vs_vllm_by_round": paired,
            "agreement": agree,
        },
        "targets": [target("optgptq output tok/s / transformers output tok/s (medians)",
                           "transformers", 3.0),
                    target("optgptq output tok/s / vLLM-CPU output tok/s (median of the rounds' "
                           "ratios)", "vllm", 1.0)],
        "notes": notes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
