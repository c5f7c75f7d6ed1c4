"""Paged attention on the CPU (the PyTorch reference and the native kernel) against dense
attention (repeat_interleave GQA, explicit masks), and the dispatch between them."""

import math

import pytest
import torch

from optgptq_kernels import cpu_native, ops, paged_attention_cpu
from optgptq_kernels.paged_attention import paged_attention_ref
from optgptq.models.layers import alibi_slopes

IMPLS = {"reference": paged_attention_ref, "native": paged_attention_cpu.paged_attention_cpu}


@pytest.fixture(params=sorted(IMPLS))
def attention(request):
    """Each CPU implementation, called directly. The native one must build here: CI has a
    compiler, and a silent fallback would leave the engine's CPU path untested."""
    if request.param == "native":
        assert cpu_native.available(), "the native CPU kernel did not build"
    return IMPLS[request.param]


def dense_attention(q, k, v, q_pos, slopes):
    """q [n, H, D], k/v [L, Hkv, D]; float64, heads repeated explicitly."""
    h, hkv = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(h // hkv, dim=1)
    v = v.double().repeat_interleave(h // hkv, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k) / math.sqrt(q.shape[-1])
    key_pos = torch.arange(k.shape[0])
    if slopes is not None:
        scores = scores + slopes.double().view(-1, 1, 1) * (key_pos.view(1, 1, -1) - q_pos.view(1, -1, 1))
    scores = scores.masked_fill(key_pos.view(1, 1, -1) > q_pos.view(1, -1, 1), float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (16, 2)])
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("block_size", [4, 16])
def test_varlen_paged_attention_matches_dense(attention, num_heads, num_kv_heads, alibi,
                                              block_size):
    g = torch.Generator().manual_seed(num_heads * 100 + block_size + alibi)
    head_dim, num_blocks = 24, 64
    # (context length after the step, new query tokens): decodes, a whole prefill, a chunk after
    # a cached prefix, block-boundary lengths
    shapes = [(1, 1), (block_size, 1), (block_size + 1, 1), (37, 37), (45, 13), (2 * block_size, 5), (29, 1)]
    k_cache = torch.full((num_kv_heads, num_blocks, block_size, head_dim), 1e4)
    v_cache = torch.full_like(k_cache, -1e4)  # stale values in unwritten slots must get no weight
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, qs, ks, vs, starts = [], [], [], [], [0]
    for length, n in shapes:
        nb = -(-length // block_size)
        blocks = [perm.pop() for _ in range(nb)]
        tables.append(blocks)
        k = torch.randn(length, num_kv_heads, head_dim, generator=g)
        v = torch.randn(length, num_kv_heads, head_dim, generator=g)
        slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(length)])
        ops.write_kv(k, v, k_cache, v_cache, slots)
        ks.append(k)
        vs.append(v)
        qs.append(torch.randn(n, num_heads, head_dim, generator=g))
        starts.append(starts[-1] + n)
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    seq_lens = torch.tensor([s[0] for s in shapes], dtype=torch.int32)
    slopes = alibi_slopes(num_heads) if alibi else None
    out = attention(torch.cat(qs), k_cache, v_cache, block_tables, seq_lens,
                    torch.tensor(starts, dtype=torch.int32), head_dim ** -0.5, slopes)
    for i, (length, n) in enumerate(shapes):
        ref = dense_attention(qs[i], ks[i], vs[i], torch.arange(length - n, length), slopes)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]].double(), ref, rtol=1e-5, atol=1e-5)


def test_alibi_slopes_match_bloom():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for heads in (4, 12, 16, 20):
        hf = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32).view(heads, 2)[:, 1]
        torch.testing.assert_close(alibi_slopes(heads), hf, rtol=0, atol=0)


def test_many_decodes_grouped_by_length_match_dense(attention):
    """More decode sequences than one gather group, with mixed lengths and a shared block pool."""
    from optgptq_kernels.paged_attention import DECODE_GROUP

    g = torch.Generator().manual_seed(7)
    hkv, heads, d, bs = 2, 8, 16, 4
    lens = torch.randint(1, 60, (2 * DECODE_GROUP + 5,), generator=g).tolist()
    num_blocks = sum(-(-n // bs) for n in lens)
    k_cache = torch.randn(hkv, num_blocks, bs, d, generator=g)
    v_cache = torch.randn(hkv, num_blocks, bs, d, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range(-(-n // bs))] for n in lens]
    width = max(map(len, tables))
    q = torch.randn(len(lens), heads, d, generator=g)
    out = attention(
        q, k_cache, v_cache, torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        torch.tensor(lens, dtype=torch.int32), torch.arange(len(lens) + 1, dtype=torch.int32), d ** -0.5)
    for i, (n, table) in enumerate(zip(lens, tables)):
        k = k_cache[:, table].reshape(hkv, -1, d)[:, :n].transpose(0, 1)
        v = v_cache[:, table].reshape(hkv, -1, d)[:, :n].transpose(0, 1)
        ref = dense_attention(q[i:i + 1], k, v, torch.tensor([n - 1]), None)
        torch.testing.assert_close(out[i:i + 1].double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 128, 40])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 2), (16, 2)])
def test_native_kernel_matches_reference(monkeypatch, head_dim, num_heads, num_kv_heads):
    """The head sizes the native decode kernel compiles for (64, 128) and its generic path, in a
    mixed batch: decodes around prefill chunks (whole prompts, one after a cached prefix, one
    spanning several key panels and query tiles), with ALiBi, against the reference on the same
    cache; a batch of decodes alone never calls the reference, nor does a mixed one where the
    prefill kernel is compiled."""
    assert cpu_native.available()
    g = torch.Generator().manual_seed(head_dim + num_heads)
    bs = 16
    shapes = [(1, 1), (93, 53), (300, 1), (32, 32), (bs, 1), (17, 1), (230, 70)]
    num_blocks = sum(-(-n // bs) for n, _ in shapes) + 3
    k_cache = torch.randn(num_kv_heads, num_blocks, bs, head_dim, generator=g)
    v_cache = torch.randn(num_kv_heads, num_blocks, bs, head_dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range(-(-n // bs))] for n, _ in shapes]
    width = max(map(len, tables)) + 1
    block_tables = torch.tensor([t + [perm[0]] * (width - len(t)) for t in tables],
                                dtype=torch.int32)
    q = torch.randn(sum(n for _, n in shapes), num_heads, head_dim, generator=g)
    starts = torch.tensor([0] + [n for _, n in shapes], dtype=torch.int32).cumsum(0).int()
    lens = torch.tensor([n for n, _ in shapes], dtype=torch.int32)
    native = cpu_native.ops()

    class WithoutPrefill:  # the path of builds without the prefill kernel (no AVX-512)
        def __getattr__(self, name):
            return (lambda: False) if name == "avx512_built" else getattr(native, name)

    for slopes in (None, alibi_slopes(num_heads)):
        args = (q, k_cache, v_cache, block_tables, lens, starts, head_dim ** -0.5, slopes)
        expected = paged_attention_ref(*args)
        torch.testing.assert_close(paged_attention_cpu.paged_attention_cpu(*args), expected,
                                   rtol=1e-5, atol=2e-6)
        with monkeypatch.context() as m:
            m.setattr(cpu_native, "ops", WithoutPrefill)
            torch.testing.assert_close(paged_attention_cpu.paged_attention_cpu(*args), expected,
                                       rtol=1e-5, atol=2e-6)
    decodes = [0, 2, 4, 5]
    args = (q[starts[decodes].long()], k_cache, v_cache, block_tables[decodes], lens[decodes],
            torch.arange(len(decodes) + 1, dtype=torch.int32), head_dim ** -0.5, None)
    expected = paged_attention_ref(*args)
    mixed = (q, k_cache, v_cache, block_tables, lens, starts, head_dim ** -0.5, None)
    expected_mixed = paged_attention_ref(*mixed)
    monkeypatch.setattr(paged_attention_cpu, "paged_attention_ref", None)  # must not be called
    torch.testing.assert_close(paged_attention_cpu.paged_attention_cpu(*args), expected,
                               rtol=1e-5, atol=2e-6)
    if cpu_native.ops().avx512_built():
        torch.testing.assert_close(paged_attention_cpu.paged_attention_cpu(*mixed),
                                   expected_mixed, rtol=1e-5, atol=2e-6)


def test_native_kernel_rejects_bad_block_ids_and_dtypes():
    assert cpu_native.available()
    k_cache = torch.randn(2, 4, 16, 64)
    q = torch.randn(1, 4, 64)
    lens, starts = torch.tensor([20], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="block id 9 out of range"):
        paged_attention_cpu.paged_attention_cpu(q, k_cache, k_cache,
                                                torch.tensor([[0, 9]], dtype=torch.int32),
                                                lens, starts, 0.125)
    with pytest.raises(RuntimeError, match="block table narrower"):
        paged_attention_cpu.paged_attention_cpu(q, k_cache, k_cache,
                                                torch.tensor([[0]], dtype=torch.int32),
                                                lens, starts, 0.125)
    if cpu_native.ops().avx512_built():  # the prefill kernel checks its own rows
        with pytest.raises(RuntimeError, match="block id 9 out of range"):
            paged_attention_cpu.paged_attention_cpu(torch.randn(3, 4, 64), k_cache, k_cache,
                                                    torch.tensor([[0, 9]], dtype=torch.int32),
                                                    lens, torch.tensor([0, 3], dtype=torch.int32),
                                                    0.125)
    with pytest.raises(RuntimeError, match="float32"):
        paged_attention_cpu.paged_attention_cpu(q.half(), k_cache.half(), k_cache.half(),
                                                torch.tensor([[0, 1]], dtype=torch.int32),
                                                lens, starts, 0.125)


@pytest.mark.parametrize("mode,dtype,native", [("auto", torch.float32, True),
                                               ("reference", torch.float32, False),
                                               ("auto", torch.bfloat16, False)])
def test_dispatch_picks_the_native_kernel_for_float32_cpu(monkeypatch, mode, dtype, native):
    calls = []
    real = paged_attention_cpu.paged_attention_cpu
    monkeypatch.setattr(paged_attention_cpu, "paged_attention_cpu",
                        lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("OPTGPTQ_KERNELS", mode)
    k_cache = torch.randn(2, 4, 16, 64, dtype=dtype)
    out = ops.paged_attention(torch.randn(2, 4, 64, dtype=dtype), k_cache, k_cache,
                              torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                              torch.tensor([20, 7], dtype=torch.int32),
                              torch.tensor([0, 1, 2], dtype=torch.int32), 0.125)
    assert out.dtype == dtype and bool(calls) == native
