"""The Opt-GPTQ paper's experiment on a GPU: MHA vs Opt-GQA, fp16 vs GPTQ 4-bit, with plots.

The paper (Llama3-8B on a Hygon DCU) reports MHA 0.42 req/s, 230.74 tok/s, generate 119.38
tok/s, latency 52.30 s against Opt-GQA 0.70 req/s, 239.14 tok/s, 122.55 tok/s, 57.40 s, and
claims 32% more long-sequence throughput and 41% less peak memory. This script runs the same
comparison with this engine.

Model: Llama-3.1-8B's architecture (32 layers, hidden 4096, 32 query heads, FFN 14336, vocab
128256, llama3 RoPE to 128k positions) with **random weights** (``load_format: dummy``: nothing
can be downloaded; speed and memory do not depend on the values). Variants: MHA (32 KV heads),
Opt-GQA with 8 and 4 KV heads, each in fp16 and GPTQ 4-bit (group 128; random codes in the
checkpoint layout, served by the Triton kernels). ``--small`` runs a 1B-class shape for checks.

Workloads (token-id prompts drawn with a fixed seed, greedy, EOS ignored, all submitted at once):

- ``throughput`` (vLLM's benchmark_throughput style): ``--num-requests`` requests of
  ``--input-len`` + ``--output-len`` tokens. Every variant gets the same KV pool bytes
  (``--kv-gib``), as on one accelerator: fewer KV heads hold more sequences at once.
- ``long``: for each context in ``--contexts``, ``--long-requests`` requests of that many prompt
  tokens and ``--long-output`` new ones; the pool holds exactly the longest run's requests at
  once for every variant (the same batch capacity), so peak memory compares like for like.
- ``small``: one request at a time (batch 1), the decode speed that GPTQ targets.
- transformers ``generate`` on the throughput requests, in padded batches of ``--hf-batch``
  (the baseline a user would otherwise pick), for the fp16 Opt-GQA-8 model (Llama-3-8B itself).

Per run: latency (the whole run, as the paper reports it), requests/s, total tokens/s,
generate tokens/s, peak GPU memory (``torch.cuda.max_memory_allocated``), the KV pool's bytes and
KV bytes per token; ``--repeats`` timed runs, after ``--warmup`` untimed ones of the same
requests, give mean, min and max. Writes
``bench/results/paper/<gpu>.json``, ``<gpu>.md`` and the PNG plots (``bench/paper_plots.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optgptq.engine.llm import LLM  # noqa: E402
from optgptq.engine.sampling_params import SamplingParams  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, vocab_size=128256, max_position_embeddings=131072,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192})
SMALL = dict(LLAMA3_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32)
KV_HEADS = {"MHA": 32, "Opt-GQA-8": 8, "Opt-GQA-4": 4}
WORKLOADS = ("throughput", "small", "long")
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq"}


def write_config(root: Path, arch: dict, kv_heads: int, quant: str) -> Path:
    folder = root / f"kv{kv_heads}-{quant}"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(arch, architectures=["LlamaForCausalLM"], model_type="llama",
               num_key_value_heads=kv_heads, torch_dtype="float16", bos_token_id=1,
               eos_token_id=2, hidden_act="silu", attention_bias=False, mlp_bias=False)
    if quant == "gptq4":
        cfg["quantization_config"] = GPTQ
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def timed_run(llm: LLM, reqs: list[list[int]], output_len: int, repeats: int,
              warmup: int) -> dict:
    """``warmup`` untimed runs of the same requests (kernel compilation for every shape the
    run meets, allocator growth), then ``repeats`` timed ones."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for _ in range(warmup):
        llm.generate(reqs, params)
    runs = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        outs = llm.generate(reqs, params)
        torch.cuda.synchronize()
        t = time.perf_counter() - t
        assert all(len(o.token_ids) == output_len for o in outs)
        prompt_tokens = sum(len(r) for r in reqs)
        runs.append({"latency_s": t, "requests_per_s": len(reqs) / t,
                     "total_tokens_per_s": (prompt_tokens + output_len * len(reqs)) / t,
                     "generate_tokens_per_s": output_len * len(reqs) / t,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
    summary = {k: {"mean": statistics.mean(r[k] for r in runs),
                   "min": min(r[k] for r in runs), "max": max(r[k] for r in runs)}
               for k in runs[0]}
    return {"runs": runs, **summary}


def engine(folder: Path, **kw) -> LLM:
    return LLM(str(folder), load_format="dummy", skip_tokenizer_init=True, dtype="float16",
               enable_prefix_caching=False, **kw)


def pool_info(llm: LLM) -> dict:
    r = llm.engine.runner
    return {"kv_pool_gib": r.num_blocks * r.bytes_per_block / 2**30, "num_blocks": r.num_blocks,
            "kv_bytes_per_token": r.bytes_per_block // r.block_size}


def run_variant(folder: Path, args, vocab: int) -> dict:
    """The workloads in ``args.workloads`` on one variant; ``throughput`` and ``small`` share
    one engine (same pool and CUDA graphs), ``long`` gets its own."""
    out: dict = {}
    thr = prompts(args.num_requests, args.input_len, vocab, seed=1)
    if {"throughput", "small"} & set(args.workloads):
        llm = engine(folder, kv_cache_bytes=int(args.kv_gib * 2**30),
                     max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                     max_num_batched_tokens=args.max_batched_tokens)
        if "throughput" in args.workloads:
            out["throughput"] = {**pool_info(llm),
                                 **timed_run(llm, thr, args.output_len, args.repeats,
                                           args.warmup)}
        if "small" in args.workloads:
            out["small"] = timed_run(llm, thr[:1], args.small_output, args.repeats,
                                   args.warmup)
        del llm
        cleanup()
    if "long" not in args.workloads:
        return out
    block = 16
    need = args.long_requests * -(-(max(args.contexts) + args.long_output) // block)
    llm = engine(folder, num_blocks=need, max_num_seqs=args.long_requests,
                 max_num_batched_tokens=args.max_batched_tokens, max_model_len=args.max_model_len)
    out["long"] = {"pool": pool_info(llm), "contexts": {}}
    for ctx in args.contexts:
        reqs = prompts(args.long_requests, ctx, vocab, seed=ctx)
        out["long"]["contexts"][str(ctx)] = timed_run(llm, reqs, args.long_output,
                                                      args.long_repeats, args.warmup)
    del llm
    cleanup()
    return out


def cleanup() -> None:
    gc.collect()
    torch.cuda.empty_cache()


@torch.inference_mode()
def hf_baseline(arch: dict, kv_heads: int, args, vocab: int) -> dict:
    """transformers' generate over padded batches of the throughput requests (random fp16)."""
    cfg = transformers.LlamaConfig(**dict(arch, num_key_value_heads=kv_heads))
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    reqs = prompts(args.num_requests, args.input_len, vocab, seed=1)[:args.hf_requests]
    ids = torch.tensor(reqs, device="cuda")
    gen = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False,
               pad_token_id=0)
    first = ids[:args.hf_batch]
    for _ in range(args.warmup):  # the first batch, untimed (its first call ran 2.7x slower)
        model.generate(first, attention_mask=torch.ones_like(first), **gen)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for i in range(0, len(reqs), args.hf_batch):
        batch = ids[i:i + args.hf_batch]
        out = model.generate(batch, attention_mask=torch.ones_like(batch), **gen)
        assert out.shape[1] == args.input_len + args.output_len
    torch.cuda.synchronize()
    t = time.perf_counter() - t
    n = len(reqs)
    res = {"requests": n, "batch": args.hf_batch, "latency_s": t, "requests_per_s": n / t,
           "total_tokens_per_s": n * (args.input_len + args.output_len) / t,
           "generate_tokens_per_s": n * args.output_len / t,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    del model
    cleanup()
    return res


def targets(res: dict) -> list[dict]:
    def t(name, value, target, better="higher"):
        met = value >= target if better == "higher" else value <= target
        return {"name": name, "value": round(value, 4), "target": target, "better": better,
                "met": bool(met)}

    v = res["variants"]
    out = []
    if "MHA fp16" in v and "Opt-GQA-8 fp16" in v:
        mha, gqa = v["MHA fp16"], v["Opt-GQA-8 fp16"]
        out.append(t("Opt-GQA-8 vs MHA requests/s (throughput run, same KV bytes)",
                     gqa["throughput"]["requests_per_s"]["mean"]
                     / mha["throughput"]["requests_per_s"]["mean"], 2.0))
        ctx = max(mha["long"]["contexts"], key=int)
        out.append(t(f"Opt-GQA-8 vs MHA peak memory reduction (long run, same batch capacity, "
                     f"{ctx} tokens)", 1 - gqa["long"]["contexts"][ctx]["peak_gib"]["max"]
                     / mha["long"]["contexts"][ctx]["peak_gib"]["max"], 0.5))
    if "hf" in res and "Opt-GQA-8 fp16" in v:
        out.append(t("engine vs transformers generate tokens/s (throughput run)",
                     v["Opt-GQA-8 fp16"]["throughput"]["total_tokens_per_s"]["mean"]
                     / res["hf"]["total_tokens_per_s"], 10.0))
    for name in ("MHA", "Opt-GQA-8", "Opt-GQA-4"):
        if f"{name} fp16" in v and f"{name} gptq4" in v:
            out.append(t(f"{name}: GPTQ 4-bit vs fp16 generate tokens/s at batch 1",
                         v[f"{name} gptq4"]["small"]["generate_tokens_per_s"]["mean"]
                         / v[f"{name} fp16"]["small"]["generate_tokens_per_s"]["mean"], 1.5))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="a 1B-class shape for quick checks")
    ap.add_argument("--variants", default="MHA,Opt-GQA-8,Opt-GQA-4")
    ap.add_argument("--quant", default="fp16,gptq4")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--kv-gib", type=float, default=24.0)
    ap.add_argument("--contexts", type=lambda s: [int(c) for c in s.split(",")],
                    default=[8192, 16384, 32768])
    ap.add_argument("--long-requests", type=int, default=4)
    ap.add_argument("--long-output", type=int, default=128)
    ap.add_argument("--long-repeats", type=int, default=1)
    ap.add_argument("--small-output", type=int, default=128)
    ap.add_argument("--workloads", type=lambda s: s.split(","), default=list(WORKLOADS),
                    help="a subset of throughput,small,long; results of the others are kept "
                         "from the previous file")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed runs of each workload (and of transformers' first batch) "
                         "before the timed ones")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=32768 + 1024)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--hf-requests", type=int, default=64, help="0 skips the baseline")
    ap.add_argument("--out", default=None, help="results json (default bench/results/paper/<gpu>.json)")
    args = ap.parse_args()
    if not args.workloads or set(args.workloads) - set(WORKLOADS):
        ap.error(f"--workloads: a comma-separated subset of {','.join(WORKLOADS)}")
    if not torch.cuda.is_available():
        raise SystemExit("bench/paper.py measures a GPU: no CUDA device here")
    arch = SMALL if args.small else LLAMA3_8B
    gpu = torch.cuda.get_device_name().split()[-1].lower()
    out = Path(args.out or Path(__file__).parent / "results" / "paper" / f"{gpu}.json")
    prev = json.loads(out.read_text()) if out.exists() else {}
    res = {"machine": torch.cuda.get_device_name(),
           "versions": {"torch": torch.__version__, "triton": _triton_version(),
                        "transformers": transformers.__version__,
                        "python": platform.python_version()},
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": "python " + " ".join(sys.argv),
           "commit": os.environ.get("OPTGPTQ_COMMIT", "unknown"),
           "weights": "random (load_format dummy): speed and memory only",
           "model": "small 1B-class shape" if args.small else "Llama-3.1-8B architecture",
           "settings": vars(args), "variants": dict(prev.get("variants", {}))}
    if "hf" in prev:
        res["hf"] = prev["hf"]
    vocab = arch["vocab_size"]
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quant.split(","):
            for name in args.variants.split(","):
                kv = KV_HEADS[name] * arch["num_attention_heads"] // 32
                t = time.perf_counter()
                key = f"{name} {quant}"
                fresh = run_variant(write_config(Path(tmp), arch, kv, quant), args, vocab)
                for workload in fresh.values():
                    workload["commit"] = res["commit"]
                res["variants"][key] = {**res["variants"].get(key, {}), **fresh,
                                        "seconds": time.perf_counter() - t}
                print(f"{key}: {summary_line(res['variants'][key])} "
                      f"[{time.perf_counter() - t:.0f}s]", flush=True)
                save(out, res)
    if args.hf_requests:
        res["hf"] = hf_baseline(arch, 8 * arch["num_attention_heads"] // 32, args, vocab)
        print("transformers generate:", json.dumps(res["hf"]), flush=True)
    res["targets"] = targets(res)
    save(out, res)
    for t in res["targets"]:
        print(("MET " if t["met"] else "MISSED ") + f"{t['name']}: {t['value']} "
              f"(target {t['target']})")


def summary_line(v: dict) -> str:
    parts = []
    if "throughput" in v:
        thr = v["throughput"]
        parts.append(f"{thr['requests_per_s']['mean']:.2f} req/s, "
                     f"{thr['total_tokens_per_s']['mean']:.0f} tok/s, "
                     f"gen {thr['generate_tokens_per_s']['mean']:.0f} tok/s, "
                     f"latency {thr['latency_s']['mean']:.1f} s, "
                     f"peak {thr['peak_gib']['max']:.1f} GiB")
    if "small" in v:
        parts.append(f"batch-1 {v['small']['generate_tokens_per_s']['mean']:.0f} tok/s")
    return ", ".join(parts)


def save(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(path)


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "none"


if __name__ == "__main__":
    main()
