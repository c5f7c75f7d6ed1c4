"""The paged attention reference against dense attention (repeat_interleave GQA, explicit masks)."""

import math

import pytest
import torch

from optgptq_kernels import ops
from optgptq.models.layers import alibi_slopes


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
def test_varlen_paged_attention_matches_dense(num_heads, num_kv_heads, alibi, block_size):
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
    out = ops.paged_attention(torch.cat(qs), k_cache, v_cache, block_tables, seq_lens,
                              torch.tensor(starts, dtype=torch.int32), head_dim ** -0.5, slopes)
    for i, (length, n) in enumerate(shapes):
        ref = dense_attention(qs[i], ks[i], vs[i], torch.arange(length - n, length), slopes)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]].double(), ref, rtol=1e-5, atol=1e-5)


def test_alibi_slopes_match_bloom():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for heads in (4, 12, 16, 20):
        hf = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32).view(heads, 2)[:, 1]
        torch.testing.assert_close(alibi_slopes(heads), hf, rtol=0, atol=0)


def test_many_decodes_grouped_by_length_match_dense():
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
    out = ops.paged_attention(
        q, k_cache, v_cache, torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        torch.tensor(lens, dtype=torch.int32), torch.arange(len(lens) + 1, dtype=torch.int32), d ** -0.5)
    for i, (n, table) in enumerate(zip(lens, tables)):
        k = k_cache[:, table].reshape(hkv, -1, d)[:, :n].transpose(0, 1)
        v = v_cache[:, table].reshape(hkv, -1, d)[:, :n].transpose(0, 1)
        ref = dense_attention(q[i:i + 1], k, v, torch.tensor([n - 1]), None)
        torch.testing.assert_close(out[i:i + 1].double(), ref, rtol=1e-5, atol=1e-5)
