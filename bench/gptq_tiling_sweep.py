"""Tiling sweep of the fused GPTQ dequant-GEMM kernel against fp16 ``torch.matmul`` (GPU only).

For 4-bit group-128 weights of Llama-3-8B's shapes and each M given (default ``256,64``), prints
fp16's time, the dispatch's own path (``gptq_linear_triton``) and the four best tilings of the
``fused`` kernel (BLOCK_M x BLOCK_N x BLOCK_K, warps, stages) with their relative error against
the dispatch's output. Used to decide which path serves which M; findings are kept in the notes
of ``bench/results/kernels-<gpu>.json``. Usage: ``python bench/gptq_tiling_sweep.py [M,M,...]``.
"""
import itertools
import sys
import time

import torch
from triton.testing import do_bench_cudagraph
from triton.runtime.errors import OutOfResources

from optgptq_kernels import gptq_triton as gt

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]   # K x N
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); 128 x 256 tiles need 8 warps
TILINGS = [t for t in itertools.product([64, 128], [64, 128, 256], [64, 128], [4, 8], [3, 4])
           if t[:2] != (128, 256) or t[3] != 4]


def bench(fn) -> float:
    """Median seconds per call, replayed from a CUDA graph."""
    return do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e-3


def sweep(m: int, k: int, n: int, g: torch.Generator) -> None:
    groups = k // 128
    x = torch.randn(m, k, dtype=torch.float16, device="cuda", generator=g)
    qw = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda",
                       generator=g)
    qz = torch.randint(-2**31, 2**31 - 1, (groups, n // 8), dtype=torch.int32, device="cuda",
                       generator=g)
    sc = (torch.rand(groups, n, device="cuda", generator=g) * 0.01).half()
    gi = (torch.arange(k, device="cuda") // 128).int()
    ref = gt.gptq_linear_triton(x, qw, qz, sc, gi, 4)
    w = gt.dequantize_triton(qw, qz, sc, gi, 4, torch.float16)
    t_fp16 = bench(lambda: x @ w)
    t_cur = bench(lambda: gt.gptq_linear_triton(x, qw, qz, sc, gi, 4))
    print(f"M={m} K={k} N={n}: fp16 {t_fp16 * 1e6:.1f} us, dispatch {t_cur * 1e6:.1f} us "
          f"({t_fp16 / t_cur:.2f}x)", flush=True)
    rows = []
    for bm, bn, bk, warps, stages in TILINGS:
        out = torch.empty_like(ref)

        def call():
            gt.launch(x, qw, qz, sc, gi, 4, None, out, 128, True, "fused", bm, bn, bk, 1,
                      num_warps=warps, num_stages=stages)
        try:
            call()
        except OutOfResources:
            continue
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        rows.append((bench(call), bm, bn, bk, warps, stages, err))
    for t, bm, bn, bk, warps, stages, err in sorted(rows)[:4]:
        print(f"   fused BM{bm} BN{bn} BK{bk} w{warps} s{stages}: {t * 1e6:.1f} us  "
              f"{t_fp16 / t:.2f}x fp16  relerr {err:.1e}", flush=True)


def main() -> None:
    ms = [int(a) for a in sys.argv[1].split(",")] if len(sys.argv) > 1 else [256, 64]
    g = torch.Generator(device="cuda").manual_seed(0)
    start = time.time()
    for m in ms:
        for k, n in SHAPES:
            sweep(m, k, n, g)
            print(f"  [{time.time() - start:.0f}s]", flush=True)


if __name__ == "__main__":
    main()
