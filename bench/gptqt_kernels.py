"""GPTQT's binary-coded GEMM on a GPU against the GPTQ kernel at the same bits and torch fp16.

For Llama-3-8B's linear shapes (K x N in 4096x4096, 4096x14336, 14336x4096), M in {1, 4, 16,
64, 256}, 3 and 2 bits, one group size for both formats (``--group-size``, default 128):

- ``bcq_us``: :func:`optgptq_kernels.bcq_triton.bcq_linear_triton` as the engine calls it
  (LUT-GEMM for M <= ``LUT_MAX_M[bits]``, bit-plane dot for M <= ``FUSED_MAX_M``,
  dequantize + matmul above);
- ``bcq_lut_us`` / ``bcq_dot_us`` for M <= 16: both small-batch kernels forced, to tune the
  switch point (``LUT_MAX_M``);
- ``gptq_us``: :func:`optgptq_kernels.gptq_triton.gptq_linear_triton` at the same bits;
- ``fp16_us``: ``x @ w`` with a dense float16 weight.

Each output is first checked against the PyTorch reference. Times are medians of
``triton.testing.do_bench_cudagraph`` (CUDA-graph replays; a measurement that fails is NaN, its
traceback printed). The section is merged into
``bench/results/kernels-<gpu>.json`` under the key ``gptqt_kernels`` and its targets are added to
the file's ``targets`` (read, modify, write to a temporary file, rename; the rest of the file is
kept; run it after ``bench/kernel_speed.py``, which rewrites that file)::

    python bench/gptqt_kernels.py [--out bench/results] [--group-size 128]

``--tiny`` runs small shapes with ``time.perf_counter`` on whatever device there is (on a CPU
with ``TRITON_INTERPRET=1``), to check the script itself.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from optgptq_kernels.bcq import bcq_linear_ref
from optgptq_kernels.bcq_triton import FUSED_MAX_M, LUT_MAX_M, bcq_linear_triton
from optgptq_kernels.gptq_triton import gptq_linear_triton

sys.path.insert(0, str(Path(__file__).parent))
import report  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
ROWS = (1, 4, 16, 64, 256)
DTYPE = torch.float16


def _timer(gpu: bool):
    if gpu:
        from triton.testing import do_bench_cudagraph

        def gpu(fn) -> float:
            fn()                       # first call outside any capture (caches, lock buffers)
            torch.cuda.synchronize()
            # Each capture unrolls ~100 ms of calls whose allocations come from the graph's own
            # pool; released pools stay reserved, and a capture that must free cached memory
            # to grow fails (cudaFree is not allowed while capturing), so release them first.
            torch.cuda.empty_cache()
            try:
                return do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e-3
            except Exception:          # report the failure in the row, measure the rest
                traceback.print_exc()
                torch.cuda.synchronize()
                return float("nan")
        return gpu

    def cpu(fn) -> float:
        fn()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return cpu


def _rand_words(g: torch.Generator, *shape: int, device: str) -> torch.Tensor:
    return torch.randint(-2 ** 31, 2 ** 31 - 1, shape, dtype=torch.int32, device=device,
                         generator=g)


def measure(k: int, n: int, m: int, bits: int, group: int, device: str, bench,
            g: torch.Generator) -> dict:
    groups = k // group
    dtype = DTYPE if device == "cuda" else torch.float32
    x = torch.randn(m, k, device=device, generator=g).to(dtype)
    planes = _rand_words(g, bits, k // 32, n, device=device)
    alphas = (torch.rand(groups, bits, n, device=device, generator=g) * 0.01).half()
    offsets = (torch.randn(groups, n, device=device, generator=g) * 0.001).half()
    bcq = (planes, alphas, offsets, group)
    ref = bcq_linear_ref(x.float(), planes, alphas.float(), offsets.float(), group)
    got = bcq_linear_triton(x, *bcq).float()
    err = float((got - ref).norm() / ref.norm())
    assert err < 2e-3, f"BCQ kernel disagrees with the reference: relative error {err}"
    qweight = _rand_words(g, k * bits // 32, n, device=device)
    qzeros = _rand_words(g, groups, n * bits // 32, device=device)
    scales = (torch.rand(groups, n, device=device, generator=g) * 0.01).to(DTYPE)
    g_idx = (torch.arange(k, device=device) // group).int()
    gptq = (qweight, qzeros, scales, g_idx, bits)
    gptq_linear_triton(x, *gptq)                                # caches the group layout
    w = torch.randn(k, n, device=device, generator=g).to(dtype)
    row = {"K": k, "N": n, "M": m, "bits": bits,
           "bcq_us": bench(lambda: bcq_linear_triton(x, *bcq)) * 1e6,
           "gptq_us": bench(lambda: gptq_linear_triton(x, *gptq)) * 1e6,
           "fp16_us": bench(lambda: x @ w) * 1e6}
    if m <= 16:
        for path in ("lut", "dot"):
            row[f"bcq_{path}_us"] = bench(lambda: bcq_linear_triton(x, *bcq, path=path)) * 1e6
    row["speedup_vs_gptq"] = row["gptq_us"] / row["bcq_us"]
    row["speedup_vs_fp16"] = row["fp16_us"] / row["bcq_us"]
    return row


def targets(rows: list[dict]) -> list[dict]:
    def m1(bits: int, key: str) -> float:
        return min(r[key] for r in rows if r["M"] == 1 and r["bits"] == bits)

    return [
        report.target("GPTQT 3-bit kernel vs GPTQ 3-bit kernel, M=1 (min over Llama-3-8B "
                      "shapes; the paper's 1.24x on OPT-30B)", m1(3, "speedup_vs_gptq"), 1.24),
        report.target("GPTQT 2-bit kernel vs GPTQ 2-bit kernel, M=1 (min over Llama-3-8B "
                      "shapes)", m1(2, "speedup_vs_gptq"), 1.0),
        report.target("GPTQT 3-bit kernel vs torch fp16 matmul, M=1 (min over Llama-3-8B "
                      "shapes)", m1(3, "speedup_vs_fp16"), 1.0),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--tiny", action="store_true",
                        help="small shapes, perf_counter timing, any device (a script check)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu and not args.tiny:
        sys.exit("bench/gptqt_kernels.py needs a GPU (torch.cuda); --tiny checks it on a CPU")
    device = "cuda" if gpu else "cpu"
    shapes, ms = ([(256, 96)], (1, 4, 16, 70)) if args.tiny else (SHAPES, ROWS)
    g = torch.Generator(device).manual_seed(0)
    bench = _timer(gpu)
    rows = []
    print(f"{'bits':>4} {'K':>6} {'N':>6} {'M':>4} {'bcq us':>8} {'lut us':>8} {'dot us':>8} "
          f"{'gptq us':>8} {'fp16 us':>8} {'x gptq':>7} {'x fp16':>7}")
    for bits in (3, 2):
        for k, n in shapes:
            for m in ms:
                r = measure(k, n, m, bits, args.group_size, device, bench, g)
                rows.append(r)
                print(f"{bits:>4} {k:>6} {n:>6} {m:>4} {r['bcq_us']:>8.1f} "
                      f"{r.get('bcq_lut_us', float('nan')):>8.1f} "
                      f"{r.get('bcq_dot_us', float('nan')):>8.1f} {r['gptq_us']:>8.1f} "
                      f"{r['fp16_us']:>8.1f} {r['speedup_vs_gptq']:>7.2f} "
                      f"{r['speedup_vs_fp16']:>7.2f}", flush=True)
    short = report.gpu_short_name() if gpu else f"cpu-{platform.machine()}"
    section = {
        **report.gpu_header(), "group_size": args.group_size, "lut_max_m": LUT_MAX_M,
        "fused_max_m": FUSED_MAX_M, "dtype": "float16" if gpu else "float32 (interpreter)",
        "timing": "median of do_bench_cudagraph" if gpu else "one perf_counter call (script check)",
        "results": rows, "targets": targets(rows)}
    path = Path(args.out) / f"kernels-{short}.json"
    report.merge_section(path, "gptqt_kernels", section)
    report.print_targets(section["targets"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
