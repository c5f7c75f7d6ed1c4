"""Decode step of Llama-3-8B against its roofline, fp16 and GPTQ 4-bit, batch 1 to 256 (issue 22).

Model: Llama-3-8B's shape (``bench/paper.py``'s ``LLAMA3_8B``, 8 KV heads) with random weights
(``load_format: dummy``), fp16 and GPTQ 4-bit group 128 (``paper.GPTQ``: dummy GPTQ quantizes
every linear but the LM head: q, k, v, o, gate, up, down; embeddings, norms and the head stay
fp16). One engine per model (CUDA graphs on), its KV pool holding the largest batch at full
length and its token budget one whole batch's prefill, so each run is one prefill step and then
pure decode steps.

Step time: for each batch, requests of 128 random prompt tokens (greedy, EOS ignored) are run
with 1 and with 129 output tokens; a decode step is ``(t_129 - t_1) / 128`` (prefill, admission
and the first sample cancel), each ``t`` the median of ``--repeats`` timed runs after one untimed
run of both lengths. Checked on every run, the untimed ones first: each request returns exactly
the tokens asked for, and its first token is that of the first 1-token run (greedy, same prompt).

Step limit: ``max(bytes / read bandwidth, FLOPs / matmul peak)``, both ceilings measured in the
same process (``x.sum()`` over 2 GiB of fp16 and an 8192^3 fp16 matmul, best of 10, CUDA events).
Bytes, from the shape: every weight once (fp16: 2 bytes a parameter; a GPTQ-4 K x N linear:
qweight K*N/2 + scales K/128*N*2 + qzeros K/128*N/2 + g_idx 4K), the full LM head, ``batch``
embedding rows, the norms, and the KV cache at the mean context of the 128 steps (128 + 64
tokens, ``2 * layers * kv_heads * head_dim * 2`` bytes a token). FLOPs: ``2 * linear params *
batch`` plus attention ``4 * layers * heads * head_dim * context * batch``. Reported per row:
step ms, tok/s (batch / step), GPTQ/fp16, and the fraction of the step limit reached.

Writes ``bench/results/decode-<gpu>.json``. ``--tiny --device cpu`` is a smoke check (float32,
the CPU kernels, 256 MiB and 1024^3 probes): ``python bench/decode_roofline.py --tiny --batches 1,2
--device cpu``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import report
from bench.paper import GPTQ, LLAMA3_8B, SMALL, prompts, write_config
from optgptq.engine.llm import LLM
from optgptq.engine.sampling_params import SamplingParams

TINY = dict(LLAMA3_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, vocab_size=1024)
SHAPES = {"llama3-8b": (LLAMA3_8B, 8), "small": (SMALL, 8), "tiny": (TINY, 2)}
PROMPT, STEPS, BLOCK = 128, 128, 16
NAMES = {"fp16": "fp16", "gptq4": "GPTQ-4"}


def step_cost(arch: dict, kv_heads: int, quant: str, batch: int, context: int,
              itemsize: int) -> tuple[int, int]:
    """(bytes read, FLOPs) of one decode step of ``batch`` sequences at ``context`` tokens."""
    h, f, layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    heads, vocab = arch["num_attention_heads"], arch["vocab_size"]
    d = h // heads
    linears = [(h, heads * d), (h, kv_heads * d), (h, kv_heads * d), (heads * d, h),
               (h, f), (h, f), (f, h)]  # (K, N) of q, k, v, o, gate, up, down
    params = sum(k * n for k, n in linears)
    if quant == "gptq4":
        gs = GPTQ["group_size"]
        weights = sum(k * n // 2 + -(-k // gs) * n * (2 + 1 / 2) + 4 * k for k, n in linears)
    else:
        weights = params * itemsize
    head = vocab * h * itemsize
    embed = 0 if arch.get("tie_word_embeddings") else batch * h * itemsize
    norms = (2 * layers + 1) * h * itemsize
    kv = batch * context * 2 * layers * kv_heads * d * itemsize
    flops = 2 * (layers * params + vocab * h) * batch + 4 * layers * heads * d * context * batch
    return int(layers * weights + head + embed + norms + kv), flops


def best_seconds(fn, device: str, n: int = 10) -> float:
    fn()  # warm-up (allocator, cuBLAS handles)
    times = []
    for _ in range(n):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return min(times)


@torch.inference_mode()
def ceilings(device: str, dtype: torch.dtype) -> dict:
    """Read bandwidth (a sum over one big tensor) and matmul rate, in the engine's dtype; each
    probe's tensors are freed when its function returns."""
    cuda = device.startswith("cuda")
    nbytes, n = (2 << 30, 8192) if cuda else (256 << 20, 1024)

    def read() -> float:
        x = torch.empty(nbytes // dtype.itemsize, dtype=dtype, device=device).uniform_(-1, 1)
        return best_seconds(lambda: x.sum(), device)

    def matmul() -> float:
        a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
        return best_seconds(lambda: a @ b, device)

    read_s, mm_s = read(), matmul()
    if cuda:
        torch.cuda.empty_cache()
    return {"read_GBps": nbytes / read_s / 1e9, "matmul_TFLOPs": 2 * n ** 3 / mm_s / 1e12,
            "dtype": str(dtype).removeprefix("torch."), "read_probe_bytes": nbytes,
            "matmul_n": n, "method": "best of 10: x.sum() over read_probe_bytes; n^3 matmul"}


def run(llm: LLM, reqs: list[list[int]], n_out: int, device: str) -> tuple[float, list[int]]:
    """Seconds of one ``generate`` and each request's first token, all lengths checked."""
    params = SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    outs = llm.generate(reqs, params)
    sync()
    t = time.perf_counter() - t
    bad = [i for i, o in enumerate(outs) if len(o.token_ids) != n_out]
    if bad:
        raise SystemExit(f"request {bad[0]} returned {len(outs[bad[0]].token_ids)} tokens, "
                         f"asked for {n_out}")
    return t, [o.token_ids[0] for o in outs]


def measure(folder: Path, quant: str, arch: dict, kv_heads: int, args, ceil: dict,
            dtype: torch.dtype) -> list[dict]:
    top = max(args.batches)
    llm = LLM(str(folder), device=args.device, dtype=str(dtype).removeprefix("torch."),
              load_format="dummy", skip_tokenizer_init=True, enable_prefix_caching=False,
              num_blocks=top * (-(-(PROMPT + STEPS + 1) // BLOCK) + 1), max_num_seqs=top,
              max_num_batched_tokens=top * PROMPT, max_model_len=512, enforce_eager=False)
    rows = []
    context = PROMPT + STEPS // 2
    for batch in args.batches:
        reqs = prompts(batch, PROMPT, arch["vocab_size"], seed=batch)
        _, first = run(llm, reqs, 1, args.device)  # untimed warm-up of both lengths
        t1s, t129s = [], []
        for n_out, times in [(STEPS + 1, None)] + [(STEPS + 1, t129s), (1, t1s)] * args.repeats:
            t, tokens = run(llm, reqs, n_out, args.device)
            if tokens != first:
                j = next(k for k, (a, b) in enumerate(zip(tokens, first)) if a != b)
                raise SystemExit(f"{quant} batch {batch}: request {j}'s first token is "
                                 f"{tokens[j]} in a {n_out}-token run, {first[j]} in the "
                                 f"first 1-token run (greedy, same prompt)")
            if times is not None:
                times.append(t)
        t1, t129 = statistics.median(t1s), statistics.median(t129s)
        step = (t129 - t1) / STEPS
        nbytes, flops = step_cost(arch, kv_heads, quant, batch, context, dtype.itemsize)
        read_s = nbytes / (ceil["read_GBps"] * 1e9)
        flop_s = flops / (ceil["matmul_TFLOPs"] * 1e12)
        limit = max(read_s, flop_s)
        rows.append({"quant": quant, "batch": batch, "step_ms": step * 1e3,
                     "tokens_per_s": batch / step, "t1_s": t1s, "t129_s": t129s,
                     "bytes_per_step": nbytes, "flops_per_step": flops,
                     "mean_context": context, "limit_ms": limit * 1e3,
                     "bound": "bandwidth" if read_s >= flop_s else "compute",
                     "fraction_of_limit": limit / step})
        print(f"{NAMES[quant]:>7} batch {batch:>4}: step {step * 1e3:8.3f} ms, "
              f"{batch / step:9.1f} tok/s, limit {limit * 1e3:7.3f} ms "
              f"({rows[-1]['bound']}), {100 * limit / step:5.1f}% of it", flush=True)
    del llm
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def targets(rows: list[dict]) -> list[dict]:
    ratio = [(r["batch"], r["vs_fp16"]) for r in rows if "vs_fp16" in r]

    def frac(quant: str, lo: int, hi: int) -> list[float]:
        return [r["fraction_of_limit"] for r in rows
                if r["quant"] == quant and lo <= r["batch"] <= hi]

    checks = [("GPTQ-4 decode tok/s / fp16, min over batches", [v for _, v in ratio], 1.0),
              ("GPTQ-4 / fp16 at batch <= 16, min", [v for b, v in ratio if b <= 16], 2.0),
              ("GPTQ-4 fraction of step limit, min at batch 1-64", frac("gptq4", 1, 64), 0.7),
              ("fp16 fraction of step limit, min at batch 1-64", frac("fp16", 1, 64), 0.9),
              ("fp16 fraction of step limit at batch 256", frac("fp16", 256, 256), 0.8)]
    return [report.target(name, min(values), goal) for name, values, goal in checks if values]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")],
                    default=[1, 16, 64, 256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--quant", type=lambda s: s.split(","), default=list(NAMES))
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (smoke check)")
    shape = ap.add_mutually_exclusive_group()
    shape.add_argument("--small", action="store_true", help="paper.py's 1B-class shape")
    shape.add_argument("--tiny", action="store_true",
                       help="hidden 256, 2 layers, FFN 512, vocab 1024, 4 heads / 2 KV heads")
    args = ap.parse_args()
    if set(args.quant) - set(NAMES) or not args.quant:
        ap.error(f"--quant: a comma-separated subset of {','.join(NAMES)}")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here (use --device cpu --tiny for a smoke check)")
    if cuda and ":" in args.device:
        torch.cuda.set_device(args.device)
    name = "small" if args.small else "tiny" if args.tiny else "llama3-8b"
    arch, kv_heads = SHAPES[name]
    dtype = torch.float16 if cuda else torch.float32
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    res = {"machine": torch.cuda.get_device_name() if cuda else report.cpu_machine(),
           "versions": {"torch": torch.__version__, "triton": triton_version,
                        "cuda": torch.version.cuda, "python": platform.python_version()},
           "date": report.now(), "command": report.command(), "commit": report.commit(),
           "model": f"{name} shape, {kv_heads} KV heads, random weights (load_format dummy), "
                    f"{str(dtype).removeprefix('torch.')}",
           "method": f"step = (t(1 + {STEPS} tokens) - t(1 token)) / {STEPS}, {PROMPT}-token "
                     f"prompts, medians of {args.repeats}; limit = max(bytes / read_GBps, "
                     f"FLOPs / matmul_TFLOPs) at mean context {PROMPT + STEPS // 2}",
           "settings": vars(args), "ceilings": ceilings(args.device, dtype), "rows": [],
           "targets": []}
    c = res["ceilings"]
    print(f"read {c['read_GBps']:.0f} GB/s, {c['dtype']} matmul {c['matmul_TFLOPs']:.1f} TFLOP/s",
          flush=True)
    path = Path(args.out) / f"decode-{report.gpu_short_name() if cuda else 'cpu'}.json"
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quant:
            folder = write_config(Path(tmp), arch, kv_heads, quant)
            res["rows"] += measure(folder, quant, arch, kv_heads, args, c, dtype)
            fp16 = {r["batch"]: r for r in res["rows"] if r["quant"] == "fp16"}
            for r in res["rows"]:
                if r["quant"] == "gptq4" and r["batch"] in fp16:
                    r["vs_fp16"] = r["tokens_per_s"] / fp16[r["batch"]]["tokens_per_s"]
            res["targets"] = targets(res["rows"])
            report.write_atomic(path, json.dumps(res, indent=1) + "\n")
    for r in res["rows"]:
        if "vs_fp16" in r:
            print(f"GPTQ-4 / fp16 at batch {r['batch']}: {r['vs_fp16']:.2f}")
    report.print_targets(res["targets"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
