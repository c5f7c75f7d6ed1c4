"""The CUDA GPTQ GEMM (optgptq_kernels.gptq_cuda): layout, arithmetic, build and kernel.

On any machine: the repacked layout read back by ``emulate`` equals the reference bit for bit;
the lane/nibble table agrees with the PTX ISA's mma.m16n8k16 fragment formulas; a numpy
simulation of one warp's data path (swizzled shared memory -> ldmatrix -> A fragments, words ->
float16x2 dequantization with the header's own constants -> B fragments -> mma) reproduces the
product; unsupported weights are refused. Where nvcc is installed: the header compiles for sm_80
and sm_90 without register spills. On an NVIDIA GPU (sm_80+): the kernel at every config, many
M, group sizes, act-order, zero points, split-K and bias against the float64 product and the
emulation, run to run determinism, counters back at zero, and CUDA-graph capture and replay.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from optgptq_kernels import gptq_cuda as gc
from optgptq_kernels.gptq import dequantize_ref, gptq_linear_ref, pack_cols, pack_rows

HEADER = Path(gc.__file__).with_name("gptq_cuda.cuh")
GPU = torch.cuda.is_available() and gc.available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU (sm_80+) and a CUDA build")


def make_gptq(g: torch.Generator, k: int, n: int, group_size: int, act_order: bool, sym: bool,
              device: str = "cpu") -> list[torch.Tensor]:
    """qweight, qzeros, scales, g_idx of random codes; act-order as GPTQ's desc_act writes it."""
    size = k if group_size == -1 else group_size
    groups = -(-k // size)
    g_idx = torch.arange(k) // size
    if act_order:
        g_idx = g_idx[torch.argsort(torch.randperm(k, generator=g))]
    q = torch.randint(0, 16, (k, n), generator=g)
    z = torch.full((groups, n), 8) if sym else torch.randint(1, 17, (groups, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.005).half()
    return [t.to(device) for t in (pack_rows(q, 4), pack_cols(z - 1, 4), scales, g_idx.int())]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


# ---------------------------------------------------------------- layout and arithmetic (CPU)

CASES = [(64, 64, 16), (256, 192, 32), (512, 64, 64), (256, 192, 128), (512, 192, -1),
         (320, 64, 128)]  # K, N, group size (320 / 128: a short last group)


@pytest.mark.parametrize("k,n,group_size", CASES)
@pytest.mark.parametrize("act_order,sym", [(False, False), (True, False), (False, True),
                                           (True, True)])
def test_emulate_matches_reference(k, n, group_size, act_order, sym):
    g = torch.Generator().manual_seed(k + n + group_size + 2 * act_order + sym)
    packed = make_gptq(g, k, n, group_size, act_order, sym)
    prepared = gc.prepare(*packed, 4)
    assert prepared is not None and (prepared.zeros is None) == sym
    assert (prepared.perm is not None) == (act_order and group_size != -1)
    assert prepared.tiles.shape == (k * n // 32, 4)
    w16 = dequantize_ref(*packed, 4, torch.float16)
    assert torch.equal(gc.emulate_weight(prepared), w16)  # bit-identical dequantization
    w64 = dequantize_ref(*packed, 4, torch.float64)
    for m in (1, 3, 17, 100):
        bias = torch.randn(n, generator=g)
        x = torch.randn(m, k, generator=g)
        for xs in (x, x.half().float()):  # float32, and float16 values held in float32
            out = gc.emulate(xs, prepared, bias)
            assert rel_err(out, xs.double() @ w16.double() + bias.double()) < 1e-6
            assert rel_err(out, xs.double() @ w64 + bias.double()) < 2e-3
            assert rel_err(out, gptq_linear_ref(xs, *packed, 4, bias).double()) < 2e-3


def test_lane_table_is_the_ptx_b_fragment():
    """Nibble i of a lane's word lands in B register pair P = i % 4 (the dequantization: pair 0
    from bits 0-3/16-19, 1 from 4-7/20-23, 2 and 3 the same after >> 8), half e = i // 4; pair P
    is register r = P % 2 of n8 subtile h = P // 2. PTX ISA, m16n8k16 .f16 B: element b_j of a
    lane is at row 2 t + (j & 1) + 8 (j >= 2), column g; registers hold (b0, b1), (b2, b3)."""
    assert sorted(gc._TILE_INDEX.tolist()) == list(range(256))  # every tile element once
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(8):
            pair, e = i % 4, i // 4
            h, r = pair // 2, pair % 2
            j = 2 * r + e
            assert gc.LANE_ROWS[lane, i] == 2 * t + (j & 1) + 8 * (j >= 2)
            assert gc.LANE_COLS[lane, i] == g + 8 * h


_CONSTS = {name: int(value, 16) for name, value in
           re.findall(r"constexpr uint32_t (k\w+) = (0x[0-9A-Fa-f]+)u;", HEADER.read_text())}


def _halves(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bits = np.asarray(bits, dtype=np.uint32)
    return ((bits & 0xFFFF).astype(np.uint16).view(np.float16),
            (bits >> 16).astype(np.uint16).view(np.float16))


def _pack(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return lo.view(np.uint16).astype(np.uint32) | (hi.view(np.uint16).astype(np.uint32) << 16)


def _op2(fn, *args: np.ndarray) -> np.ndarray:
    """A float16x2 instruction: exact in float64 on these operands, rounded once to float16."""
    lows, highs = zip(*(_halves(a) for a in args))
    return _pack(*(fn(*(v.astype(np.float64) for v in vs)).astype(np.float16)
                   for vs in (lows, highs)))


def _dequant8(w, zlo0, zhi0, s0, zlo1, zhi1, s1) -> list[np.ndarray]:
    """dequant8 of gptq_cuda.cuh, with its constants."""
    c = _CONSTS
    w = np.asarray(w, dtype=np.uint32)
    out = []
    for word, zlo, zhi, s in ((w, zlo0, zhi0, s0), (w >> 8, zlo1, zhi1, s1)):
        lo = _op2(lambda a, b: a - b, (word & 0x000F000F) | c["kMagic"], zlo)
        hi = _op2(lambda a, b, d: a * b + d, (word & 0x00F000F0) | c["kMagic"],
                  np.full_like(word, c["kSixteenth"]), zhi)
        out += [_op2(lambda a, b: a * b, lo, s), _op2(lambda a, b: a * b, hi, s)]
    return out


def simulate_kernel(x: torch.Tensor, p: gc.PreparedGPTQ) -> tuple[np.ndarray, np.ndarray]:
    """One warp's path through the kernel per 16x16 tile, for x float16 [M, K] (M <= 16 a
    tile): (out float32 [M, N], the dequantized weight in the kernel's row order)."""
    k, n, gs = p.k, p.n, p.group_size
    if p.perm is not None:
        x = x.index_select(1, p.perm.long())
    m = x.shape[0]
    xs = np.zeros((-(-m // 16) * 16, k), np.float16)
    xs[:m] = x.numpy()
    words = p.tiles.view(k // 64, n // 16, 32, 4).numpy().view(np.uint32)
    sbits = p.scales.view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
    zbits = None if p.zeros is None else \
        p.zeros.view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    out = np.zeros((xs.shape[0], n), np.float32)
    w = np.zeros((k, n), np.float16)
    for m0 in range(0, xs.shape[0], 16):
        for kb in range(k // 64):
            # the stage's x slice, 16-byte chunk c of row r stored at chunk c ^ (r % 8)
            smem = np.zeros((16 * 8, 8), np.float16)
            for r in range(16):
                for ch in range(8):
                    smem[r * 8 + (ch ^ (r & 7))] = xs[m0 + r, kb * 64 + ch * 8:kb * 64 + ch * 8 + 8]
            for kk in range(4):
                row = (lane & 7) + ((lane >> 3) & 1) * 8  # ldmatrix addresses, as the kernel
                ch = 2 * kk + (lane >> 4)
                provided = smem[row * 8 + (ch ^ (row & 7))]  # the row each lane addresses
                a = np.zeros((16, 16), np.float32)
                # register j: matrix j's row g, addressed by lane 8j + g, elements 2t + e; in PTX's
                # A fragment a_{2j + e} is at row g + 8 (j % 2), column 2t + e + 8 (j // 2)
                for j, e in ((j, e) for j in range(4) for e in range(2)):
                    a[g + 8 * (j % 2), 2 * t + e + 8 * (j // 2)] = provided[8 * j + g, 2 * t + e]
                srow = (kk * (1 if gs >= 64 else 64 // gs)) >> 2
                group = kb * 64 // gs + srow
                for nt in range(n // 16):
                    col = nt * 16 + 2 * g
                    sp = sbits[group, col] | (sbits[group, col + 1] << 16)
                    s0, s1 = (sp & 0xFFFF) * 0x10001, (sp >> 16) * 0x10001
                    if zbits is None:
                        zlo0 = zlo1 = np.full(32, _CONSTS["kSymLo"], np.uint32)
                        zhi0 = zhi1 = np.full(32, _CONSTS["kSymHi"], np.uint32)
                    else:
                        zp = zbits[group, col] | (zbits[group, col + 1] << 16)
                        zlo0, zlo1 = (zp & 0xFFFF) * 0x10001, (zp >> 16) * 0x10001
                        k960 = np.full(32, _CONSTS["k960"], np.uint32)
                        zhi0 = _op2(lambda u, v: u - v, k960, zlo0)
                        zhi1 = _op2(lambda u, v: u - v, k960, zlo1)
                    b = _dequant8(words[kb, nt, :, kk], zlo0, zhi0, s0, zlo1, zhi1, s1)
                    bm = np.zeros((16, 16), np.float16)
                    for h in range(2):  # PTX B: b_{2r + e} at row 2t + e + 8r, column g
                        for r in range(2):
                            lo, hi = _halves(b[2 * h + r])
                            bm[2 * t + 8 * r, g + 8 * h], bm[2 * t + 1 + 8 * r, g + 8 * h] = lo, hi
                    rows = slice(kb * 64 + kk * 16, kb * 64 + kk * 16 + 16)
                    w[rows, nt * 16:nt * 16 + 16] = bm
                    out[m0:m0 + 16, nt * 16:nt * 16 + 16] += a @ bm.astype(np.float32)
    return out[:m], w


@pytest.mark.parametrize("k,n,group_size", [(128, 64, 16), (128, 64, 32), (192, 64, 64),
                                            (128, 128, -1)])
@pytest.mark.parametrize("act_order,sym", [(False, False), (True, False), (True, True)])
def test_simulated_warp_path(k, n, group_size, act_order, sym):
    g = torch.Generator().manual_seed(k + n + group_size + act_order + sym)
    packed = make_gptq(g, k, n, group_size, act_order, sym)
    prepared = gc.prepare(*packed, 4)
    x = torch.randn(20, k, generator=g).half()
    out, w = simulate_kernel(x, prepared)
    w16 = gc.emulate_weight(prepared, original_order=False)
    assert np.array_equal(w.view(np.uint16), w16.numpy().view(np.uint16))
    assert torch.equal(gc.emulate_weight(prepared), dequantize_ref(*packed, 4, torch.float16))
    ref = x.double() @ dequantize_ref(*packed, 4, torch.float16).double()
    assert rel_err(torch.from_numpy(out), ref) < 1e-6


def test_dequant_arithmetic_is_exact_for_every_code_and_zero():
    """All 16 codes x 16 zero points x float16 scales from subnormal to large: the kernel's
    float16 arithmetic gives exactly float16(float32(s) * (q - z))."""
    q = np.arange(16, dtype=np.uint32)
    word = q | (q << 4) | (q << 8) | (q << 12) | (q << 16) | (q << 20) | (q << 24) | (q << 28)
    scales = np.array([2.0 ** -24, 3e-7, 0.0123, 0.5, 1.0, 7.77, 1000.0, 4000.0], np.float16)
    for z in range(1, 17):
        zlo = np.full(16, 0x6400 + z, np.uint32) * 0x10001
        zhi = _op2(lambda u, v: u - v, np.full(16, _CONSTS["k960"], np.uint32), zlo)
        if z == 8:
            assert (zlo == _CONSTS["kSymLo"]).all() and (zhi == _CONSTS["kSymHi"]).all()
        for s in scales:
            sb = np.full(16, int(s.view(np.uint16)) * 0x10001, np.uint32)
            for reg in _dequant8(word, zlo, zhi, sb, zlo, zhi, sb):
                lo, hi = _halves(reg)
                expect = (np.float32(s) * (q.astype(np.float32) - z)).astype(np.float16)
                assert np.array_equal(lo.view(np.uint16), expect.view(np.uint16))
                assert np.array_equal(hi.view(np.uint16), expect.view(np.uint16))


@pytest.mark.parametrize("change", ["bits", "k", "n", "group48", "uneven_act_order", "bf16"])
def test_prepare_refuses_what_the_kernel_cannot_run(change):
    g = torch.Generator().manual_seed(1)
    k, n, group_size = {"k": (96, 128, 32), "n": (256, 96, 64), "group48": (192, 128, 48)}.get(
        change, (256, 128, 64))
    qweight, qzeros, scales, g_idx = make_gptq(g, k, n, group_size, False, False)
    assert change in ("k", "n", "group48") or gc.prepare(qweight, qzeros, scales, g_idx, 4)
    if change == "uneven_act_order":  # sorted, groups of 80, 48, 64 and 64 rows
        sizes = torch.tensor([80, 48, 64, 64])
        g_idx = torch.repeat_interleave(torch.arange(4), sizes)[torch.randperm(k, generator=g)]
    if change == "bf16":
        scales = scales.bfloat16()
    assert gc.prepare(qweight, qzeros, scales, g_idx.int(), 8 if change == "bits" else 4) is None


# ---------------------------------------------------------------- nvcc (where installed)

@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_header_compiles_without_spills(tmp_path):
    """Every instance, as torch.utils.cpp_extension compiles it (its half-operator defines)."""
    src = tmp_path / "check.cu"
    src.write_text('#include "gptq_cuda.cuh"\n'
                   "cudaError_t run(const optgptq_cuda::GemmParams& p, int c, cudaStream_t s) {\n"
                   "  return optgptq_cuda::gptq_gemm(p, c, s);\n}\n")
    flags = ["-O3", "-std=c++17", "-Xptxas", "-v", "-D__CUDA_NO_HALF_OPERATORS__",
             "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
             "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", f"-I{HEADER.parent}"]
    runs = {arch: subprocess.Popen(["nvcc", *flags, f"-arch={arch}", "-c", str(src), "-o",
                                    str(tmp_path / f"{arch}.o")], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
            for arch in ("sm_80", "sm_90")}
    for arch, run in runs.items():
        log = run.communicate(timeout=600)[0]
        assert run.returncode == 0, log
        spills = re.findall(r"(\d+) bytes spill stores", log)
        assert len(spills) == 2 * len(gc.CONFIGS) and set(spills) == {"0"}, log


# ---------------------------------------------------------------- the kernel (GPU)

M_VALUES = [1, 2, 7, 16, 17, 33, 64, 100, 128, 256, 300]


def _gpu_case(seed: int, k: int, n: int, group_size: int, act_order: bool, sym: bool):
    g = torch.Generator().manual_seed(seed)
    packed = make_gptq(g, k, n, group_size, act_order, sym, "cuda")
    return g, packed, gc.prepare(*packed, 4)


def _check(x, packed, prepared, bias, **kw) -> torch.Tensor:
    out = torch.full((x.shape[0], prepared.n), float("nan"), dtype=torch.float16, device="cuda")
    gc.gptq_linear_cuda(x, prepared, bias, out=out, **kw)
    w64 = dequantize_ref(*packed, 4, torch.float64)
    ref = x.double() @ w64 + (0 if bias is None else bias.double())
    assert rel_err(out, ref) < 1e-3
    assert rel_err(out, gptq_linear_ref(x, *packed, 4, bias).double()) < 2e-3
    assert rel_err(out, gc.emulate(x, prepared, bias).double()) < 1e-3
    return out


@needs_gpu
def test_configs_match_the_header():
    for i, c in enumerate(gc.CONFIGS):
        bm, bn, stages, threads, _ = torch.ops.optgptq_cuda.gptq_config_info(i)
        assert (bm, bn, stages, threads) == (c.bm, c.bn, c.stages, 32 * c.warps_m * c.warps_n)


@needs_gpu
@pytest.mark.parametrize("config", range(len(gc.CONFIGS)))
@pytest.mark.parametrize("n", [192, 384])
def test_kernel_every_config(config, n):
    g, packed, prepared = _gpu_case(config * 10 + n, 1024, n, 128, False, False)
    for m in M_VALUES:
        x = torch.randn(m, 1024, generator=g).half().cuda()
        bias = torch.randn(n, generator=g).half().cuda()
        for split in (1, None, 16):  # none, the default, the most
            _check(x, packed, prepared, bias if split != 1 else None, config=config, split_k=split)


@needs_gpu
@pytest.mark.parametrize("group_size", [16, 32, 64, 128, -1])
@pytest.mark.parametrize("act_order,sym", [(False, False), (True, False), (False, True),
                                           (True, True)])
def test_kernel_groups(group_size, act_order, sym):
    g, packed, prepared = _gpu_case(group_size + 4 * act_order + sym, 2048, 256, group_size,
                                    act_order, sym)
    for m in (1, 33, 300):
        x = torch.randn(m, 2048, generator=g).half().cuda()
        _check(x, packed, prepared, torch.randn(256, generator=g).half().cuda())


@needs_gpu
def test_kernel_deterministic_and_counters_reset():
    g, packed, prepared = _gpu_case(7, 4096, 512, 128, True, False)
    x = torch.randn(5, 4096, generator=g).half().cuda()
    first = _check(x, packed, prepared, None, split_k=8)
    for _ in range(3):
        assert torch.equal(gc.gptq_linear_cuda(x, prepared, split_k=8), first)
    torch.cuda.synchronize()
    assert int(gc._LOCKS[x.device][-1].abs().sum()) == 0


@needs_gpu
def test_kernel_llama_shapes():
    for k, n in ((4096, 4096), (4096, 14336), (14336, 4096)):
        g, packed, prepared = _gpu_case(k + n, k, n, 128, False, False)
        for m in (1, 16, 64, 256):
            _check(torch.randn(m, k, generator=g).half().cuda(), packed, prepared, None)


@needs_gpu
def test_cuda_graph_capture_and_replay():
    g, packed, prepared = _gpu_case(3, 2048, 384, 64, True, False)
    x = torch.randn(4, 2048, generator=g).half().cuda()
    bias = torch.randn(384, generator=g).half().cuda()
    eager = gc.gptq_linear_cuda(x, prepared, bias)  # warm up: build, counters, smem opt-in
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gc.gptq_linear_cuda(x, prepared, bias)
    graph.replay()
    assert torch.equal(captured, eager)
    x.copy_(torch.randn(4, 2048, generator=g).half())
    graph.replay()
    assert torch.equal(captured, gc.gptq_linear_cuda(x, prepared, bias))


@needs_gpu
def test_rejects_other_dtypes():
    _, _, prepared = _gpu_case(1, 256, 64, 64, False, False)
    with pytest.raises(TypeError):
        gc.gptq_linear_cuda(torch.zeros(2, 256, dtype=torch.bfloat16, device="cuda"), prepared)
