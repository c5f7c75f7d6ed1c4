"""Every Triton kernel against its PyTorch reference and a float64 oracle.

Without an accelerator the kernels run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1 before Triton loads), in float32 on small odd shapes. With one, the same tests
run on the device in float16 and bfloat16 at real shapes (Llama-3-8B's heads), within the
relative error the dtype allows. Outputs are poisoned with NaN before each run, so an element a
kernel forgets to write fails the test.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from optgptq.engine.llm import LLM
from optgptq.engine.sampling_params import SamplingParams
from optgptq.models.layers import alibi_slopes
from optgptq_kernels.gptq import dequantize_ref, gptq_linear_ref, pack_cols, pack_rows
from optgptq_kernels.kv_write import write_kv_ref
from optgptq_kernels.pointwise import add_rms_norm_ref, rotary_ref, silu_and_mul_ref
from tests.conftest import random_prompt
from tests.test_bcq import write_gptqt
from tests.test_gptq_format import write_gptq_twins
from tests.test_paged_attention import dense_attention

triton = pytest.importorskip("triton", reason="Triton is not installed")

from optgptq_kernels import paged_attention_triton as pat  # noqa: E402
from optgptq_kernels.gptq_triton import dequantize_triton, gptq_linear_triton  # noqa: E402
from optgptq_kernels.kv_write_triton import write_kv_triton  # noqa: E402
from optgptq_kernels.pointwise_triton import (add_rms_norm_triton, rotary_triton,  # noqa: E402
                                              silu_and_mul_triton)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if GPU else [torch.float32]
# relative error (Frobenius norm) against float64 allowed per operand dtype
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def _assert_close(out: torch.Tensor, expect: torch.Tensor, exact_on_cpu: bool = False) -> None:
    """Within a few units in the last place of the dtype (sums in another order, another rsqrt
    or exp, fused multiply-adds); equal on the CPU where no reduction or transcendental is
    involved (the interpreter rounds as the reference does)."""
    assert out.dtype == expect.dtype and out.shape == expect.shape
    if exact_on_cpu and not GPU:
        assert torch.equal(out, expect)
    else:
        ulp = torch.finfo(out.dtype).eps
        torch.testing.assert_close(out, expect, rtol=4 * ulp, atol=ulp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [200, 4096])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_reference(dtype, n, with_residual):
    g = torch.Generator().manual_seed(n)
    x, residual = _rand(g, dtype, 37, n), _rand(g, dtype, 37, n) * 3
    weight = 1 + _rand(g, dtype, n) * 0.1
    out, total = add_rms_norm_triton(x, weight, 1e-5, residual if with_residual else None)
    expect, expect_total = add_rms_norm_ref(x, weight, 1e-5, residual if with_residual else None)
    assert torch.equal(total, expect_total)      # the residual sum rounds once, like torch
    _assert_close(out, expect)
    if with_residual:  # a column-major residual (a transposed view) reads the same values
        out_t, total_t = add_rms_norm_triton(x, weight, 1e-5, residual.t().contiguous().t())
        assert torch.equal(total_t, total) and torch.equal(out_t, out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (9, 3, 80), (4, 4, 64)])
def test_rotary_matches_reference(dtype, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(heads)
    t, max_pos = 23, 500
    freqs = torch.rand(max_pos, head_dim // 2, generator=g) * torch.arange(max_pos)[:, None]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)
    positions = torch.randint(0, max_pos, (t,), generator=g).to(DEVICE)
    q = _rand(g, dtype, t, heads * head_dim)
    k = _rand(g, dtype, t, kv_heads * head_dim)
    got = rotary_triton(positions, q, k, cos, sin, heads, kv_heads)
    expect = rotary_ref(positions, q, k, cos, sin, heads, kv_heads)
    _assert_close(got[0], expect[0], exact_on_cpu=True)
    _assert_close(got[1], expect[1], exact_on_cpu=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("merged", [False, True])
def test_silu_and_mul_matches_reference(dtype, merged):
    g = torch.Generator().manual_seed(3)
    if merged:  # the two halves of a merged gate/up product: row-strided views
        gate, up = (_rand(g, dtype, 7, 6000) * 4).split(3000, dim=1)
    else:
        gate, up = _rand(g, dtype, 7, 3000) * 4, _rand(g, dtype, 7, 3000)
    _assert_close(silu_and_mul_triton(gate, up), silu_and_mul_ref(gate, up))


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    hkv, blocks, bs, d, t = 3, 20, 16, 40, 37
    k = _rand(g, dtype, t, hkv, d)
    v = _rand(g, dtype, t, hkv, d)
    slots = torch.randperm(blocks * bs, generator=g)[:t]
    slots[::5] = -1                                    # padding tokens: skipped
    slots = slots.to(DEVICE)
    caches = [_rand(g, dtype, hkv, blocks, bs, d) for _ in range(2)]
    before = [c.clone() for c in caches]
    expect = [c.clone() for c in caches]
    write_kv_triton(k, v, caches[0], caches[1], slots)
    write_kv_ref(k, v, expect[0], expect[1], slots)
    assert torch.equal(caches[0], expect[0]) and torch.equal(caches[1], expect[1])
    written = (caches[0] != before[0]).any(-1).any(0).flatten().nonzero().flatten()
    assert sorted(written.tolist()) == sorted(s for s in slots.tolist() if s >= 0)


def _rand(g: torch.Generator, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def _paged_case(g, shapes, heads, kv_heads, head_dim, block_size, dtype):
    """Random K/V written into a shuffled pool; per sequence (context length, new tokens)."""
    num_blocks = sum(-(-n // block_size) for n, _ in shapes) + 5
    k_cache = _rand(g, dtype, kv_heads, num_blocks, block_size, head_dim) * 50  # stale: large
    v_cache = _rand(g, dtype, kv_heads, num_blocks, block_size, head_dim) * 50
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, ks, vs, qs, starts = [], [], [], [], [0]
    for length, n in shapes:
        blocks = [perm.pop() for _ in range(-(-length // block_size))]
        tables.append(blocks)
        k = _rand(g, dtype, length, kv_heads, head_dim)
        v = _rand(g, dtype, length, kv_heads, head_dim)
        slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size
                              for p in range(length)], device=DEVICE)
        write_kv_ref(k, v, k_cache, v_cache, slots)
        ks.append(k)
        vs.append(v)
        qs.append(_rand(g, dtype, n, heads, head_dim))
        starts.append(starts[-1] + n)
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                device=DEVICE)
    seq_lens = torch.tensor([s for s, _ in shapes], dtype=torch.int32, device=DEVICE)
    return (torch.cat(qs), k_cache, v_cache, block_tables, seq_lens,
            torch.tensor(starts, dtype=torch.int32, device=DEVICE)), (qs, ks, vs, starts)


def _check_attention(shapes, heads, kv_heads, head_dim, block_size, alibi, dtype, seed,
                     bound=None):
    """Triton attention against dense attention; ``bound`` is the ``max_seq_len`` passed (the
    longest context unless given, as a CUDA graph passes the model's length)."""
    g = torch.Generator().manual_seed(seed)
    args, (qs, ks, vs, starts) = _paged_case(g, shapes, heads, kv_heads, head_dim, block_size,
                                             dtype)
    slopes = alibi_slopes(heads).to(DEVICE) if alibi else None
    out = torch.full_like(args[0], float("nan"))
    pat.paged_attention_triton(*args, head_dim ** -0.5, slopes, max(n for _, n in shapes),
                               bound or max(s for s, _ in shapes), out=out)
    for i, (length, n) in enumerate(shapes):
        pos = torch.arange(length - n, length, device=DEVICE)
        ref = dense_attention(qs[i].cpu(), ks[i].cpu(), vs[i].cpu(), pos.cpu(),
                              None if slopes is None else slopes.cpu())
        err = rel_err(out[starts[i]:starts[i + 1]].cpu(), ref)
        assert err < TOLERANCE[dtype], (i, length, n, err)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("alibi", [False, True])
def test_decode_attention(dtype, group, alibi):
    """One query token per sequence; contexts at and around block boundaries."""
    kv_heads, head_dim = (8, 128) if GPU else (2, 24)
    lens = [1, 16, 17, 31, 64, 65, 200] + ([1000, 4097] if GPU else [])
    shapes = [(n, 1) for n in lens]
    _check_attention(shapes, kv_heads * group, kv_heads, head_dim, 16, alibi, dtype, group)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4])
def test_decode_attention_split_into_partitions(dtype, group, monkeypatch):
    """Few sequences with long contexts: keys split into partitions, then reduced."""
    monkeypatch.setattr(pat, "_parallelism", lambda device: 1 << 30)
    kv_heads, head_dim = (8, 128) if GPU else (2, 16)
    lens = [700, 1500, 3, 513] + ([32768] if GPU else [])
    _check_attention([(n, 1) for n in lens], kv_heads * group, kv_heads, head_dim, 16,
                     group == 4, dtype, 10 + group)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 8])
def test_decode_attention_partitions_follow_each_context(dtype, group, monkeypatch):
    """A bound far above the contexts (a CUDA graph's): partitions are cut per sequence from
    its own length, so short contexts spread over many, and those past a context's end (most
    of them here) are skipped by both kernels."""
    monkeypatch.setattr(pat, "_parallelism", lambda device: 1 << 30)
    kv_heads, head_dim = (8, 128) if GPU else (2, 16)
    lens = [1, 40, 700, 65, 1500]      # 1500: 24 partitions of 64 keys, reduced in two loads
    _check_attention([(n, 1) for n in lens], kv_heads * group, kv_heads, head_dim, 16,
                     group == 8, dtype, 20 + group, bound=8192)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,block_size", [(1, 16), (4, 8), (8, 16), (3, 16)])
@pytest.mark.parametrize("alibi", [False, True])
def test_prefill_attention(dtype, group, block_size, alibi):
    """Whole prompts, chunks after a cached prefix and decodes mixed in one varlen batch."""
    kv_heads, head_dim = (8, 128) if GPU else (1, 24)
    shapes = [(37, 37), (45, 13), (2 * block_size, 5), (29, 1), (block_size + 1, block_size + 1)]
    if GPU:
        shapes += [(2048, 2048), (4100, 700)]
    _check_attention(shapes, kv_heads * group, kv_heads, head_dim, block_size, alibi, dtype,
                     100 + group)


def _gptq_case(g, bits, k, n, group_size, act_order):
    groups = 1 if group_size == -1 else -(-k // group_size)
    g_idx = torch.arange(k) // (k if group_size == -1 else group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    q = torch.randint(0, 1 << bits, (k, n), generator=g)
    z = torch.randint(1, 1 << bits, (groups, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.005).half()
    return [t.to(DEVICE) for t in (pack_rows(q, bits), pack_cols(z - 1, bits), scales,
                                   g_idx.int())]


GPTQ_CASES = [  # bits, K, N, group size, act-order
    (4, 256, 96, 64, False), (4, 320, 64, 128, False), (2, 512, 32, 256, False),
    (3, 192, 64, 64, False),
    (3, 96, 32, 40, True), (2, 160, 32, -1, False), (2, 128, 64, 32, True),
    (8, 200, 64, 48, True), (8, 128, 32, -1, False),
]


@pytest.mark.parametrize("bits,k,n,group_size,act_order", GPTQ_CASES)
@pytest.mark.parametrize("m", [1, 3, 5, 17, 70])
def test_gptq_linear(bits, k, n, group_size, act_order, m):
    """GEMV (m <= GEMV_MAX_M, aligned groups), fused paths (m <= FUSED_MAX_M, split-K where
    K is long) and dequantize-then-matmul."""
    g = torch.Generator().manual_seed(bits * 1000 + k + m)
    if GPU:
        k, n = k * 16, n * 32
    packed = _gptq_case(g, bits, k, n, group_size, act_order)
    w64 = dequantize_ref(*packed, bits, torch.float64)
    assert torch.equal(dequantize_triton(*packed, bits, torch.float32),
                       dequantize_ref(*packed, bits, torch.float32))
    for dtype in DTYPES:
        x = torch.randn(m, k, generator=g).to(device=DEVICE, dtype=dtype)
        bias = torch.randn(n, generator=g).to(device=DEVICE, dtype=dtype)
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
        gptq_linear_triton(x, *packed, bits, bias, out=out)
        ref = x.double() @ w64 + bias.double()
        assert rel_err(out, ref) < TOLERANCE[dtype]
        assert rel_err(out, gptq_linear_ref(x, *packed, bits, bias).double()) < 2 * TOLERANCE[dtype]


@pytest.mark.parametrize("bits,k,n,group_size,act_order",
                         GPTQ_CASES[:4] + [GPTQ_CASES[-1], (4, 512, 64, 128, False)])
@pytest.mark.parametrize("m", [3, 6, 20])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16] if GPU else [torch.float16])
def test_gptq_linear_half_codes(bits, k, n, group_size, act_order, m, dtype):
    """16-bit activations: codes become exact floats by bit pattern (1024 + q in float16,
    128 + q in bfloat16), two per word op in the per-shift dot (m = 6), codes and zeros both
    so in the unpacked kernel (m = 20). bfloat16 on the GPU only: Triton's interpreter
    mis-handles its bit casts."""
    g = torch.Generator().manual_seed(bits + k + m)
    packed = _gptq_case(g, bits, k, n, group_size, act_order)
    x = torch.randn(m, k, generator=g).to(device=DEVICE, dtype=dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    gptq_linear_triton(x, *packed, bits, out=out)
    ref = x.double() @ dequantize_ref(*packed, bits, torch.float64)
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("k,n,group_size", [(256, 96, 64), (200, 64, 64), (512, 32, 128)])
@pytest.mark.parametrize("split_k", [1, 4])
def test_gptq_gemv_half2(k, n, group_size, split_k):
    """The float16-pair GEMV (4 bits, one float16 row): inline PTX on an NVIDIA GPU, the same
    float16 arithmetic as Triton ops in the interpreter; ragged last group (K = 200) included.
    On the GPU the dispatch also picks it in test_gptq_linear (float16, m = 1, 4 bits)."""
    import optgptq_kernels.gptq_triton as gt

    g = torch.Generator().manual_seed(k + n + split_k)
    if GPU:
        k, n = k * 16, n * 32
    packed = _gptq_case(g, 4, k, n, group_size, False)
    x = torch.randn(1, k, generator=g).to(DEVICE, torch.float16)
    bias = torch.randn(n, generator=g).to(DEVICE, torch.float16)
    out = torch.full((1, n), float("nan"), dtype=torch.float16, device=DEVICE)
    gt.launch(x, *packed, 4, bias, out, group_size, True, "gemv_half2", 1,
              512 if GPU else 32, 32, split_k)
    ref = x.double() @ dequantize_ref(*packed, 4, torch.float64) + bias.double()
    assert rel_err(out, ref) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("m", [1, 5])
def test_gptq_linear_split_k_on_long_inputs(monkeypatch, m):
    """Long inputs split over many programs (the GEMV and the per-shift dot): their partial
    sums add up, and to the same output on every call."""
    import optgptq_kernels.gptq_triton as gt

    splits, launch = [], gt.launch
    monkeypatch.setattr(gt, "_num_programs", lambda device: 64)
    monkeypatch.setattr(gt, "launch", lambda *a, **kw: splits.append(
        inspect.signature(launch).bind(*a, **kw).arguments["split_k"]) or launch(*a, **kw))
    g = torch.Generator().manual_seed(5 + m)
    packed = _gptq_case(g, 4, 2048, 32, 128, False)
    x = torch.randn(m, 2048, generator=g).to(DEVICE, DTYPES[0])
    bias = torch.randn(32, generator=g).to(DEVICE, DTYPES[0])
    out = gptq_linear_triton(x, *packed, 4, bias)
    again = gptq_linear_triton(x, *packed, 4, bias)
    ref = x.double() @ dequantize_ref(*packed, 4, torch.float64) + bias.double()
    assert splits and min(splits) > 1
    assert rel_err(out, ref) < TOLERANCE[DTYPES[0]] and torch.equal(out, again)


@pytest.mark.parametrize("name", ["llama-gqa", "bloom", "gptq", "gptqt"])
def test_engine_through_triton_equals_reference(tiny_models, tmp_path, monkeypatch, name):
    """Chunked prefill, prefix hits and decodes through every Triton kernel (the GPTQ and BCQ
    linears included) give the reference path's tokens (float32; in the interpreter on CPU)."""
    if name == "gptq":
        path = write_gptq_twins(tiny_models["llama-mha"], tmp_path)[0]
    elif name == "gptqt":
        path = write_gptqt(tiny_models["llama-mha"], tmp_path / "q", 3, 64)
    else:
        path = tiny_models[name]
    g = torch.Generator().manual_seed(9)
    shared = random_prompt(g, 40)
    prompts = [shared + random_prompt(g, n) for n in (3, 21)] + [random_prompt(g, 9)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    tokens = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("OPTGPTQ_KERNELS", mode)
        llm = LLM(str(path), device=DEVICE, dtype="float32", num_blocks=32, block_size=8,
                  max_num_batched_tokens=32)
        llm.generate(prompts[:1], params)                    # caches the shared prefix
        outs = llm.generate(prompts, params)
        assert llm.engine.stats().pool.prefix_hit_tokens > 0
        tokens[mode] = [o.token_ids for o in outs]
    assert tokens["triton"] == tokens["reference"]
