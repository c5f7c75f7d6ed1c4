"""DGQ A8W4 kernel benchmark on a GPU: time against the W4A16 GPTQ kernel and fp16, and weight
memory, at Llama-3-8B's linear shapes.

For (K x N) in 4096x4096, 4096x14336, 14336x4096 and M in {1, 16, 256, 2048}, group size 128
(the paper's), on random weights and float16 activations:

- ``fp16``: ``torch.matmul`` on a float16 weight;
- ``gptq``: the W4A16 GPTQ Triton kernel (``optgptq_kernels.gptq_triton``), 4-bit, group 128;
- ``dgq``: the engine's DGQ path (``dgq_linear_triton``: per-token INT8 quantization, then the
  fused INT8 kernel up to ``INT_MM_MIN_M`` rows and ``torch._int_mm`` above);
- ``dgq_fused``: quantization + the fused kernel at every M, best of a few tilings (the tiling
  that won is recorded); ``dgq_int_mm``: quantization + INT8 dequantization of the weight +
  ``torch._int_mm`` (M > 16, its limit); ``dgq_int_mm_predequant``: quantization +
  ``torch._int_mm`` on a weight kept in INT8 (twice the memory); ``act_quant``: quantization
  alone.

Every time is a median of ``triton.testing.do_bench_cudagraph`` (CUDA-graph replays). Targets
state the paper's figures (3.24x speed over A16W4, 1.12x less memory; the latter is end-to-end
memory in the paper, the weights alone here). The section is merged under the key ``"dgq"`` of
``bench/results/kernels-<gpu>.json``, its targets also into the file's ``targets`` (read, modify,
write to a temporary file, rename; the rest of the file is kept)::

    python bench/dgq_kernels.py [--out bench/results]

``--tiny`` runs small shapes on the CPU with ``TRITON_INTERPRET=1`` (set it before starting) to
check the script, with wall-clock times that mean nothing, into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import triton

from optgptq_kernels import dgq_triton as dt
from optgptq_kernels.dgq import dgq_linear_ref, pack_codes
from optgptq_kernels.gptq_triton import gptq_linear_triton

sys.path.insert(0, str(Path(__file__).parent))
import report  # noqa: E402

GROUP = 128
PAPER_SPEEDUP, PAPER_MEMORY = 3.24, 1.12
TILINGS = [(16, 32, 4, 4), (16, 64, 4, 4), (16, 128, 4, 4), (32, 64, 4, 4), (64, 64, 4, 4),
           (64, 128, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3)]


def bench(fn, device: str) -> float:
    """Median seconds per call."""
    if device == "cuda":
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e-3
    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def dgq_weight(k: int, n: int, g: torch.Generator, device: str):
    """Random DGQ tensors (group scales 1..8, so every INT8 weight fits)."""
    groups = k // GROUP
    codes = torch.randint(0, 16, (k, n), generator=g)
    zeros = torch.randint(0, 16, (groups, n), generator=g).to(torch.uint8)
    qscales = torch.randint(1, 9, (groups, n), generator=g).to(torch.int8)
    scales = (torch.rand(n, generator=g) * 1e-3).half()
    smooth = (1 + torch.rand(k, generator=g)).half()
    return [t.to(device) for t in (pack_codes(codes), zeros, qscales, scales, smooth)]


def gptq_weight(k: int, n: int, g: torch.Generator, device: str):
    groups = k // GROUP
    qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (k // 8, n), dtype=torch.int32, generator=g)
    qzeros = torch.randint(-2 ** 31, 2 ** 31 - 1, (groups, n // 8), dtype=torch.int32,
                           generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.01).half()
    g_idx = (torch.arange(k) // GROUP).int()
    return [t.to(device) for t in (qweight, qzeros, scales, g_idx)]


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def shape_row(k: int, n: int, m: int, g: torch.Generator, device: str, dtype) -> dict:
    dq = dgq_weight(k, n, g, device)
    gq = gptq_weight(k, n, g, device)
    w = torch.randn(k, n, generator=g).to(device, dtype)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    qweight, qzeros, qscales, scales, smooth = dq
    got = dt.dgq_linear_triton(x, *dq, GROUP)
    ref = dgq_linear_ref(x, *dq, GROUP)
    err = float((got.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12))
    assert err < 1e-2, f"DGQ Triton and reference disagree: relative error {err}"
    gptq_linear_triton(x, *gq, 4)                     # caches the group layout
    row = {"K": k, "N": n, "M": m, "rel_err_vs_reference": err}
    row["fp16_us"] = bench(lambda: x @ w, device) * 1e6
    row["gptq_us"] = bench(lambda: gptq_linear_triton(x, *gq, 4), device) * 1e6
    row["dgq_us"] = bench(lambda: dt.dgq_linear_triton(x, *dq, GROUP), device) * 1e6
    row["act_quant_us"] = bench(lambda: dt.quantize_activations_triton(x, smooth), device) * 1e6
    out = torch.empty(m, n, dtype=dtype, device=device)
    best = None
    for tiles in (TILINGS if device == "cuda" else [None]):
        if tiles is not None and tiles[0] > max(16, triton.next_power_of_2(m)):
            continue

        def fused(tiles=tiles):
            x8, s = dt.quantize_activations_triton(x, smooth)
            return dt.gemm_triton(x8, s, qweight, qzeros, qscales, scales, GROUP, None, out,
                                  tiles)
        try:
            t = bench(fused, device)
        except triton.runtime.errors.OutOfResources:
            continue
        if best is None or t < best[0]:
            best = (t, tiles)
    row["dgq_fused_us"], row["dgq_fused_tiles"] = best[0] * 1e6, best[1]
    if dt.int_mm_applies(m, k, n, torch.device(device)) or (device == "cpu" and m > 16):
        def int_mm():
            x8, s = dt.quantize_activations_triton(x, smooth)
            w8 = dt.dequantize_int8_triton(qweight, qzeros, qscales, GROUP)
            return dt.int_mm_path(x8, s, w8, scales, None, dtype)
        w8 = dt.dequantize_int8_triton(qweight, qzeros, qscales, GROUP)

        def predequant():
            x8, s = dt.quantize_activations_triton(x, smooth)
            return dt.int_mm_path(x8, s, w8, scales, None, dtype)
        row["dgq_int_mm_us"] = bench(int_mm, device) * 1e6
        row["dgq_int_mm_predequant_us"] = bench(predequant, device) * 1e6
    row["weight_bytes"] = {"fp16": nbytes(w), "gptq": nbytes(*gq), "dgq": nbytes(*dq),
                           "dgq_int8_predequant": k * n + nbytes(scales, smooth)}
    row["dgq_speedup_vs_gptq"] = row["gptq_us"] / row["dgq_us"]
    row["dgq_speedup_vs_fp16"] = row["fp16_us"] / row["dgq_us"]
    fastest = min((key for key in ("dgq_fused_us", "dgq_int_mm_us", "dgq_int_mm_predequant_us")
                   if key in row), key=row.get)
    row["fastest_dgq_path"] = fastest.removesuffix("_us")
    return row


def targets(rows: list[dict]) -> list[dict]:
    top = max(r["M"] for r in rows)
    big = [r for r in rows if r["M"] == top]
    memory = min(r["weight_bytes"]["gptq"] / r["weight_bytes"]["dgq"] for r in rows)
    return [
        report.target(f"[dgq] DGQ A8W4 vs W4A16 GPTQ kernel, M={top} (min over shapes; paper: "
                      "3.24x over A16W4)", min(r["dgq_speedup_vs_gptq"] for r in big),
                      PAPER_SPEEDUP),
        report.target(f"[dgq] DGQ A8W4 vs fp16 matmul, M={top} (min over shapes; INT8 tensor "
                      "cores)", min(r["dgq_speedup_vs_fp16"] for r in big), 1.0),
        report.target("[dgq] weight memory, W4A16 GPTQ / DGQ A8W4 (paper: 1.12x less memory end "
                      "to end, here weights only)", memory, PAPER_MEMORY),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU "
                        "(TRITON_INTERPRET=1): checks the script, times mean nothing")
    args = parser.parse_args()
    if args.tiny:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--tiny needs TRITON_INTERPRET=1 in the environment")
        device, dtype = "cpu", torch.float32
        shapes, ms, gpu = [(256, 128), (128, 256)], [1, 16, 32], "cpu-interpreter"
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/dgq_kernels.py needs a GPU (torch.cuda); --tiny checks it on a CPU")
        device, dtype = "cuda", torch.float16
        shapes, ms = [(4096, 4096), (4096, 14336), (14336, 4096)], [1, 16, 256, 2048]
        gpu = report.gpu_short_name()
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'K':>6} {'N':>6} {'M':>5} {'fp16':>8} {'gptq':>8} {'dgq':>8} {'fused':>8} "
          f"{'int_mm':>8} {'predq':>8} {'x gptq':>7} {'x fp16':>7}  fastest")
    for k, n in shapes:
        for m in ms:
            r = shape_row(k, n, m, g, device, dtype)
            rows.append(r)
            print(f"{k:>6} {n:>6} {m:>5} {r['fp16_us']:>8.1f} {r['gptq_us']:>8.1f} "
                  f"{r['dgq_us']:>8.1f} {r['dgq_fused_us']:>8.1f} "
                  f"{r.get('dgq_int_mm_us', float('nan')):>8.1f} "
                  f"{r.get('dgq_int_mm_predequant_us', float('nan')):>8.1f} "
                  f"{r['dgq_speedup_vs_gptq']:>7.2f} {r['dgq_speedup_vs_fp16']:>7.2f}  "
                  f"{r['fastest_dgq_path']}", flush=True)
    section = {**report.gpu_header(),
               "results": {"group_size": GROUP, "int_mm_min_m": dt.INT_MM_MIN_M,
                           "dgq_gemm": rows},
               "targets": targets(rows)}
    path = Path(args.out) / f"kernels-{gpu}.json"
    report.merge_section(path, "dgq", section)
    report.print_targets(section["targets"])
    print(f"wrote the 'dgq' section of {path}")


if __name__ == "__main__":
    main()
