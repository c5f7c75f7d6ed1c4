"""The native CPU pointwise kernels (``pointwise_cpu.cpp``) against their PyTorch references:
bit-exact where no reduction or transcendental is involved (residual sum, RoPE, KV write),
within a few ulp otherwise (the norm's sum of squares, SiLU's exp); and the dispatch to them."""

import mmap

import pytest
import torch

from optgptq_kernels import cpu_native, ops
from optgptq_kernels.kv_write import write_kv_ref
from optgptq_kernels.pointwise import add_rms_norm_ref, rotary_ref, silu_and_mul_ref

EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def native():
    """The extension must build here: CI has a compiler, and a silent fallback would leave the
    engine's CPU path untested."""
    assert cpu_native.available(), "the native CPU kernels did not build"
    return cpu_native.ops()


def close(out: torch.Tensor, expect: torch.Tensor, ulps: int = 4) -> None:
    torch.testing.assert_close(out, expect, rtol=ulps * EPS, atol=EPS)


@pytest.mark.parametrize("n", [576, 200, 4096])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm(native, n, with_residual):
    g = torch.Generator().manual_seed(n)
    wide = torch.randn(37, 2 * n, generator=g)
    x = wide[:, :n]  # a row-strided view
    residual = torch.randn(37, n, generator=g) * 3 if with_residual else None
    weight = 1 + torch.randn(n, generator=g) * 0.1
    out, total = native.add_rms_norm(x, residual, weight, 1e-5)
    expect, expect_total = add_rms_norm_ref(x, weight, 1e-5, residual)
    if with_residual:
        assert torch.equal(total, expect_total)
    else:
        assert total.numel() == 0  # the caller has x
    # the sum of squares is added in the vector width's order (16 lanes with AVX-512, 8 with
    # AVX2), PyTorch's in its own: over 4096 terms the two land a few ulp apart
    close(out, expect, ulps=8)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (32, 8, 128), (4, 4, 24)])
def test_rotary_is_exact(native, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(heads)
    t, max_pos = 23, 500
    freqs = torch.rand(max_pos, head_dim // 2, generator=g) * torch.arange(max_pos)[:, None]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    positions = torch.randint(0, max_pos, (t,), generator=g)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    got = native.rotary(positions, q, k, cos, sin, heads, kv_heads)
    expect = rotary_ref(positions, q, k, cos, sin, heads, kv_heads)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
    with pytest.raises(RuntimeError, match="position out of range"):
        native.rotary(positions + max_pos, q, k, cos, sin, heads, kv_heads)


def test_silu_and_mul(native):
    g = torch.Generator().manual_seed(3)
    gate, up = (torch.randn(7, 6000, generator=g) * 4).split(3000, dim=1)
    gate[0, :4] = torch.tensor([-100.0, 100.0, -88.5, 0.0])  # exp's range ends
    close(native.silu_and_mul(gate, up), silu_and_mul_ref(gate, up))


def test_write_kv_is_exact_and_skips_padding(native):
    g = torch.Generator().manual_seed(5)
    hkv, d, bs, blocks = 3, 64, 16, 8
    kv = torch.randn(10, 2 * hkv * d, generator=g)
    k, v = (part.view(10, hkv, d) for part in kv.split(hkv * d, dim=1))  # strided views
    slots = torch.randperm(blocks * bs, generator=g)[:10]
    slots[3] = -1
    caches = [torch.zeros(hkv, blocks, bs, d) for _ in range(4)]
    native.write_kv(k, v, caches[0], caches[1], slots)
    write_kv_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    with pytest.raises(RuntimeError, match="slot out of range"):
        native.write_kv(k, v, caches[0], caches[1], slots + blocks * bs)


@pytest.mark.parametrize("mode,dtype,native_used", [("auto", torch.float32, True),
                                                    ("reference", torch.float32, False),
                                                    ("auto", torch.bfloat16, False)])
def test_dispatch(monkeypatch, native, mode, dtype, native_used):
    calls = []

    class Spy:
        def __getattr__(self, name):
            op = getattr(native, name)
            return lambda *a: calls.append(name) or op(*a)

    monkeypatch.setattr(cpu_native, "ops", Spy)
    monkeypatch.setenv("OPTGPTQ_KERNELS", mode)
    x = torch.randn(4, 128, dtype=dtype)
    out, total = ops.add_rms_norm(x, torch.ones(128, dtype=dtype), 1e-5)
    assert total is x and out.dtype == dtype
    ops.silu_and_mul(x[:, :64], x[:, 64:])
    ops.rotary(torch.arange(4), x, x[:, :64], torch.ones(8, 64), torch.zeros(8, 64), 2, 1)
    cache = torch.zeros(1, 2, 4, 64, dtype=dtype)
    ops.write_kv(x[:, :64].view(4, 1, 64), x[:, 64:].view(4, 1, 64), cache, cache.clone(),
                 torch.arange(4))
    assert calls == (["add_rms_norm", "silu_and_mul", "rotary", "write_kv"] if native_used
                     else [])


def _vm_flags(t: torch.Tensor) -> list[str]:
    """The VmFlags of the mapping of this process that holds the middle of ``t`` (advising
    splits a buffer's mapping: its partial 2 MB stretches at either end are mappings of their
    own)."""
    address = t.data_ptr() + t.nbytes // 2
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return []


def test_advise_huge_pages_marks_the_kv_pool(native, tiny_models):
    """The KV pool asks for 2 MB pages before first touch: its mapping carries the kernel's
    ``hg`` flag (MADV_HUGEPAGE; whether huge pages are then found is the system's state), where
    a fresh buffer that did not ask has none."""
    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        pytest.skip("no transparent huge pages on this system")
    if "[never]" in mode:
        pytest.skip("transparent huge pages are off on this system")
    # fresh anonymous mappings of 64 MiB (torch.empty may reuse heap memory an earlier test's
    # pool advised)
    plain, asked = (torch.frombuffer(mmap.mmap(-1, 64 << 20), dtype=torch.float32)
                    for _ in range(2))
    assert ops.advise_huge_pages(asked)
    assert "hg" in _vm_flags(asked) and "hg" not in _vm_flags(plain)
    assert ops.advise_huge_pages(torch.empty(8)) is False  # under 2 MB: nothing to ask for
    from optgptq.engine.llm import LLM

    llm = LLM(str(tiny_models["llama-gqa"]), kv_cache_bytes=64 << 20)
    k_cache = llm.engine.runner.kv_caches[0][0]
    assert k_cache.nbytes >= 8 << 20 and not k_cache.any()
    assert "hg" in _vm_flags(k_cache)
