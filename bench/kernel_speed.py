"""Kernel benchmark on a GPU: paged decode attention and GPTQ GEMM against their ceilings.

In one run it measures the ceilings (device copy bandwidth, fp16 matmul rate) and then:

- Decode attention with Llama-3-8B's heads (32 query, 8 KV, head_dim 128), batch x context in
  {1, 8, 64, 256} x {512, 4096, 32768} (combinations whose cache does not fit are skipped):
  KV bytes read per second as a fraction of the copy bandwidth (bytes read + written by a
  device-to-device copy, per second) and of the read bandwidth (the faster of torch's amax and
  sum over a 1 GiB buffer) at
  uniform lengths, and, with
  mixed lengths (uniform in [1, context]), the Triton kernel against torch's
  scaled_dot_product_attention over a padded contiguous cache holding the same sequences.
- GPTQ 4-bit, group 128 GEMM for (K x N) in 4096x4096, 4096x14336, 14336x4096 and M in
  {1, 4, 16, 64, 256}: time against torch's fp16 matmul, both with cold weights (calls cycle
  through copies spanning twice the L2 cache, as a decode step reads each layer's weights once;
  the packed weights, 8-29 MB, would otherwise stay in an H200's 60 MB L2 between calls), and
  the output's relative error against a float64 product. Beside them, the read floor of each
  shape: the fastest cold read of its packed weight, zeros and scales by a plain Triton
  reduction (a small sweep of programs, block and warps). No GPTQ kernel can beat it, so
  ``fp16 time / floor`` bounds the speedup any kernel could show at that shape.

With ``--cuda`` the CUDA C++ kernel (:mod:`optgptq_kernels.gptq_cuda`, where it builds) is a
second GPTQ candidate on the same shapes: ``cuda_us`` on its own cold copies, each shape's output
checked against the float64 product before it is timed.

Every time is a median from ``triton.testing.do_bench_cudagraph`` (CUDA-graph replays, so launch
overhead is not measured). Prints a table and writes ``bench/results/kernels-<gpu>.json``;
the previous file's headline numbers are kept under ``history``.

    python bench/kernel_speed.py [--out bench/results] [--quick] [--cuda]

(Not ``kernels.py``: scripts run from ``bench/`` put it first on ``sys.path``, and
transformers probes for Hugging Face's ``kernels`` package by that name.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from optgptq_kernels import gptq_cuda
from optgptq_kernels.gptq import dequantize_ref
from optgptq_kernels.gptq_triton import gptq_linear_triton
from optgptq_kernels.paged_attention_triton import paged_attention_triton

sys.path.insert(0, str(Path(__file__).parent))
import report  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
DTYPE = torch.float16


def bench(fn) -> float:
    """Median seconds per call."""
    return do_bench_cudagraph(fn, rep=200, return_mode="median") * 1e-3


def ceilings() -> dict:
    buf = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(buf)
    copy_s = bench(lambda: dst.copy_(buf))
    floats = buf.view(torch.float32).uniform_()
    read_s = min(bench(lambda: floats.amax()), bench(lambda: floats.sum()))
    del buf, dst, floats
    a = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    mm_s = bench(lambda: a @ a)
    return {"copy_GBps": 2 * (1 << 30) / copy_s / 1e9, "read_GBps": (1 << 30) / read_s / 1e9,
            "fp16_matmul_TFLOPs": 2 * 8192 ** 3 / mm_s / 1e12}


def _decode_inputs(lens: list[int], g: torch.Generator):
    blocks_per = [triton.cdiv(n, BLOCK) for n in lens]
    num_blocks = sum(blocks_per)
    k_cache = torch.randn(KV_HEADS, num_blocks, BLOCK, HEAD_DIM, dtype=DTYPE, device="cuda",
                          generator=g)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks, device="cuda", generator=g).int()
    tables = torch.zeros(len(lens), max(blocks_per), dtype=torch.int32, device="cuda")
    start = 0
    for i, nb in enumerate(blocks_per):
        tables[i, :nb] = perm[start:start + nb]
        start += nb
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=g)
    return q, k_cache, v_cache, tables, seq_lens, qsl


def decode_attention(batch: int, ctx: int, ceil: dict, g: torch.Generator) -> dict | None:
    kv_bytes_per_token = 2 * KV_HEADS * HEAD_DIM * DTYPE.itemsize
    free, _ = torch.cuda.mem_get_info()
    # paged cache + padded SDPA copy of the mixed case, with headroom
    if 2.5 * batch * ctx * kv_bytes_per_token > 0.8 * free:
        return None
    row: dict = {"batch": batch, "context": ctx}
    args = _decode_inputs([ctx] * batch, g)
    t = bench(lambda: paged_attention_triton(*args, HEAD_DIM ** -0.5, None, 1, ctx))
    row["uniform_us"] = t * 1e6
    row["uniform_GBps"] = batch * ctx * kv_bytes_per_token / t / 1e9
    row["fraction_of_copy_bw"] = row["uniform_GBps"] / ceil["copy_GBps"]
    row["fraction_of_read_bw"] = row["uniform_GBps"] / ceil["read_GBps"]
    del args
    lens = torch.randint(1, ctx + 1, (batch,), generator=torch.Generator().manual_seed(ctx)).tolist()
    args = _decode_inputs(lens, g)
    row["mixed_triton_us"] = bench(
        lambda: paged_attention_triton(*args, HEAD_DIM ** -0.5, None, 1, max(lens))) * 1e6
    q, k_cache, v_cache, tables, seq_lens, _ = args
    width = max(lens)
    kp = torch.zeros(batch, KV_HEADS, width, HEAD_DIM, dtype=DTYPE, device="cuda")
    vp = torch.zeros_like(kp)
    for i, n in enumerate(lens):
        blocks = tables[i, :triton.cdiv(n, BLOCK)].long()
        kp[i, :, :n] = k_cache[:, blocks].reshape(KV_HEADS, -1, HEAD_DIM)[:, :n]
        vp[i, :, :n] = v_cache[:, blocks].reshape(KV_HEADS, -1, HEAD_DIM)[:, :n]
    mask = (torch.arange(width, device="cuda") < seq_lens.view(-1, 1)).view(batch, 1, 1, width)
    qs = q.view(batch, HEADS, 1, HEAD_DIM)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        qs, kp, vp, attn_mask=mask, enable_gqa=True)
    check = paged_attention_triton(*args, HEAD_DIM ** -0.5, None, 1, max(lens))
    err = (check.float() - sdpa().view(batch, HEADS, HEAD_DIM).float()).abs().max().item()
    assert err < 1e-2, f"Triton and SDPA disagree by {err}"
    row["mixed_sdpa_padded_us"] = bench(sdpa) * 1e6
    row["speedup_vs_sdpa"] = row["mixed_sdpa_padded_us"] / row["mixed_triton_us"]
    del args, kp, vp
    torch.cuda.empty_cache()
    return row


def _cold(make, nbytes: int):
    """A benchmark callable that cycles through enough copies of an operation's weights
    (``make()`` builds one copy and returns its call) to span twice the L2 cache, so that every
    call reads its weights from memory, as each layer of a model's decode step does."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    calls = [make() for _ in range(max(2, -(-2 * l2 // nbytes)))]
    torch.cuda.synchronize()  # the timing runs on another stream: nothing may still run here
    state = {"i": 0}

    def call():
        calls[state["i"] % len(calls)]()
        state["i"] += 1
    return call, len(calls)


@triton.jit
def _read_kernel(src_ptr, dst_ptr, n_words, BLOCK: tl.constexpr):
    """Sums every program's grid-strided blocks of int32 words (only the reads matter)."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    for start in range(pid * BLOCK, n_words, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + offs, mask=offs < n_words, other=0)
    tl.store(dst_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)


def read_floor(nbytes: int) -> dict:
    """Fastest cold read of ``nbytes`` over a sweep of programs per SM, block and warps."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    words = nbytes // 4
    best = None
    for per_sm, block, warps in itertools.product((2, 4, 8), (1024, 4096), (4, 8)):
        dst = torch.empty(per_sm * sms * block, dtype=torch.int32, device="cuda")

        def make():
            src = torch.randint(0, 1 << 20, (words,), dtype=torch.int32, device="cuda")
            return lambda: _read_kernel[(per_sm * sms,)](src, dst, words, BLOCK=block,
                                                          num_warps=warps)
        t = bench(_cold(make, nbytes)[0])
        if best is None or t < best["us"] * 1e-6:
            best = {"us": t * 1e6, "programs_per_sm": per_sm, "block": block, "warps": warps}
    return {**best, "bytes": nbytes, "GBps": nbytes / best["us"] / 1e3}


def gptq_gemm(k: int, n: int, m: int, g: torch.Generator, floor: dict,
              cuda: bool = False) -> dict:
    groups = k // 128
    x = torch.randn(m, k, dtype=DTYPE, device="cuda", generator=g)
    first = {}

    def weights() -> tuple:
        qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (k // 8, n), dtype=torch.int32,
                                device="cuda", generator=g)
        qzeros = torch.randint(-2 ** 31, 2 ** 31 - 1, (groups, n // 8), dtype=torch.int32,
                               device="cuda", generator=g)
        scales = (torch.rand(groups, n, device="cuda", generator=g) * 0.01).to(DTYPE)
        return qweight, qzeros, scales, (torch.arange(k, device="cuda") // 128).int()

    def rel_err(out: torch.Tensor, packed: tuple) -> float:
        ref = x.double() @ dequantize_ref(*packed, 4, torch.float64)
        return ((out.double() - ref).abs().max() / ref.abs().max()).item()

    def gptq():
        packed = weights()
        out = gptq_linear_triton(x, *packed, 4)  # caches group layout
        if "rel_err" not in first:
            first["rel_err"] = rel_err(out, packed)
        return lambda: gptq_linear_triton(x, *packed, 4)

    def cuda_kernel():
        packed = weights()
        prepared = gptq_cuda.prepare(*packed, 4)
        if "cuda_rel_err" not in first:  # checked before anything is timed
            first["cuda_rel_err"] = rel_err(gptq_cuda.gptq_linear_cuda(x, prepared), packed)
            assert first["cuda_rel_err"] < 5e-3, f"CUDA kernel wrong: {first['cuda_rel_err']}"
        return lambda: gptq_cuda.gptq_linear_cuda(x, prepared)

    def dense():
        w = torch.randn(k, n, dtype=DTYPE, device="cuda", generator=g)
        return lambda: x @ w

    q_call, q_copies = _cold(gptq, k * n // 2 + groups * n * 3)
    f_call, f_copies = _cold(dense, k * n * 2)
    t_q, t_f = bench(q_call), bench(f_call)
    row = {"K": k, "N": n, "M": m, "gptq_us": t_q * 1e6, "fp16_us": t_f * 1e6,
           "speedup_vs_fp16": t_f / t_q, "rel_err_vs_float64": first["rel_err"],
           "read_floor_us": floor["us"], "speedup_bound": t_f * 1e6 / floor["us"],
           "weight_copies": [q_copies, f_copies]}
    if cuda:
        c_call, _ = _cold(cuda_kernel, k * n // 2 + groups * n * 4)
        t_c = bench(c_call)
        row.update(cuda_us=t_c * 1e6, cuda_speedup_vs_fp16=t_f / t_c, cuda_vs_triton=t_q / t_c,
                   cuda_rel_err_vs_float64=first["cuda_rel_err"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true", help="fewer shapes, for a smoke run")
    parser.add_argument("--cuda", action="store_true", help="also time the CUDA C++ GPTQ kernel")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernel_speed.py needs a GPU (torch.cuda)")
    if args.cuda and not gptq_cuda.available():
        print("--cuda: the CUDA GPTQ kernel is unavailable here (see the warning); skipped")
        args.cuda = False
    g = torch.Generator("cuda").manual_seed(0)
    ceil = ceilings()
    print(f"copy {ceil['copy_GBps']:.0f} GB/s (read + write), read {ceil['read_GBps']:.0f} GB/s, "
          f"fp16 matmul {ceil['fp16_matmul_TFLOPs']:.0f} TFLOP/s")

    batches, contexts = ([1, 64], [512, 4096]) if args.quick else ([1, 8, 64, 256], [512, 4096, 32768])
    attn = []
    print(f"{'batch':>5} {'ctx':>6} {'us':>9} {'GB/s':>7} {'%copy':>6} {'%read':>6} "
          f"{'mixed us':>9} {'sdpa us':>9} {'x sdpa':>7}")
    for b in batches:
        for c in contexts:
            row = decode_attention(b, c, ceil, g)
            if row is None:
                print(f"{b:>5} {c:>6}  skipped: does not fit")
                continue
            attn.append(row)
            print(f"{b:>5} {c:>6} {row['uniform_us']:>9.1f} {row['uniform_GBps']:>7.0f} "
                  f"{100 * row['fraction_of_copy_bw']:>5.1f}% {100 * row['fraction_of_read_bw']:>5.1f}% "
                  f"{row['mixed_triton_us']:>9.1f} "
                  f"{row['mixed_sdpa_padded_us']:>9.1f} {row['speedup_vs_sdpa']:>7.2f}")

    gemm = []
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (4096, 14336), (14336, 4096)]
    floors = {}
    print(f"{'K':>6} {'N':>6} {'M':>4} {'gptq us':>8} {'fp16 us':>8} {'x fp16':>7} "
          f"{'floor us':>8} {'bound':>6} {'rel err':>8}" + (
              f" {'cuda us':>8} {'x fp16':>7} {'x gptq':>7} {'rel err':>8}" if args.cuda else ""))
    for k, n in shapes:
        floors[f"{k}x{n}"] = floor = read_floor(k * n // 2 + (k // 128) * n * 5 // 2)
        for m in (1, 4, 16, 64, 256):
            row = gptq_gemm(k, n, m, g, floor, args.cuda)
            gemm.append(row)
            print(f"{k:>6} {n:>6} {m:>4} {row['gptq_us']:>8.1f} {row['fp16_us']:>8.1f} "
                  f"{row['speedup_vs_fp16']:>7.2f} {row['read_floor_us']:>8.1f} "
                  f"{row['speedup_bound']:>6.2f} {row['rel_err_vs_float64']:>8.1e}" + (
                      f" {row['cuda_us']:>8.1f} {row['cuda_speedup_vs_fp16']:>7.2f} "
                      f"{row['cuda_vs_triton']:>7.2f} {row['cuda_rel_err_vs_float64']:>8.1e}"
                      if args.cuda else ""))

    big = [r for r in attn if r["batch"] * r["context"] >= 256 * 1024]
    targets = [
        report.target("decode attention, min fraction of copy bandwidth (batch x context >= 256k)",
                min((r["fraction_of_copy_bw"] for r in big), default=0.0), 0.85, "higher"),
        report.target("decode attention, min speedup vs SDPA over padded cache (mixed lengths)",
                min(r["speedup_vs_sdpa"] for r in attn), 1.0, "higher"),
        report.target("GPTQ 4-bit GEMM, min speedup vs fp16 for M <= 16",
                min(r["speedup_vs_fp16"] for r in gemm if r["M"] <= 16), 3.0, "higher"),
        report.target("GPTQ 4-bit GEMM, min speedup vs fp16 at M = 256",
                min(r["speedup_vs_fp16"] for r in gemm if r["M"] == 256), 0.9, "higher"),
    ]
    path = Path(args.out) / f"kernels-{report.gpu_short_name()}.json"
    history, old = [], {}
    if path.is_file():
        old = json.loads(path.read_text())
        history = old.get("history", []) + [{"date": old["date"], "commit": old.get("commit"),
                                             "targets": old["targets"]}]
    own = {t["name"] for t in targets}
    result = {**report.gpu_header(),
              "results": {"ceilings": ceil, "decode_attention": attn, "gptq_gemm": gemm,
                          "gptq_read_floors": floors},
              "targets": targets, "history": history}
    # Sections other benchmarks merged into this file (their own keys and targets) stay.
    result.update({k: v for k, v in old.items() if k not in result})
    result["targets"] += [t for t in old.get("targets", []) if t["name"] not in own]
    report.write_atomic(path, json.dumps(result, indent=2) + "\n")
    report.print_targets(targets)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
