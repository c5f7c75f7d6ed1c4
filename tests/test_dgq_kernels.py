"""DGQ A8W4 kernels: the PyTorch reference against an independent float64 reading of the format,
and the Triton kernels (interpreter on CPU, the device on a GPU) against the reference, bit for
bit. Outputs are poisoned with NaN before every kernel run."""

from __future__ import annotations

import pytest
import torch

from optgptq_kernels import ops
from optgptq_kernels.dgq import (check_shapes, dense_weight_ref, dgq_linear_ref, int8_weight_ref,
                                 num_groups, pack_codes, quantize_activations_ref, round_half_away)

triton = pytest.importorskip("triton", reason="Triton is not installed")

from optgptq_kernels.dgq_triton import (dequantize_int8_triton, gemm_triton,  # noqa: E402
                                        int_mm_path, quantize_activations_triton)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.float16 if GPU else torch.float32


def random_dgq(g: torch.Generator, k: int, n: int, group_size: int, extreme: bool = False):
    """Random DGQ tensors whose INT8 weight fits [-127, 127] (``extreme``: every weight is
    +-127 or close), and the codes, zeros and group scales behind them."""
    groups = num_groups(k, group_size)
    width = k if group_size == -1 else group_size
    gk = torch.arange(k) // width
    if extreme:
        u = torch.full((groups, n), 127 // 15)
        z = torch.full((groups, n), 0)
        q = torch.randint(14, 16, (k, n), generator=g)
    else:
        u = torch.randint(1, 128, (groups, n), generator=g)
        z = torch.randint(0, 16, (groups, n), generator=g)
        lim = 127 // u
        lo, hi = (z - lim).clamp(min=0)[gk], (z + lim).clamp(max=15)[gk]
        q = lo + (torch.rand(k, n, generator=g) * (hi - lo + 1)).long().clamp(max=hi - lo)
    scales = (torch.rand(n, generator=g) * 0.01 + 1e-3).half()
    smooth = (1 + torch.rand(k, generator=g) * (torch.rand(k, generator=g) < 0.1) * 8).half()
    tensors = (pack_codes(q), z.to(torch.uint8), u.to(torch.int8), scales, smooth)
    return tensors, (q, z, u, gk)


@pytest.mark.parametrize("k,n,group_size", [(96, 40, 32), (200, 24, 48), (64, 72, -1)])
def test_reference_matches_the_format(k, n, group_size):
    g = torch.Generator().manual_seed(k)
    tensors, (q, z, u, gk) = random_dgq(g, k, n, group_size)
    qweight, qzeros, qscales, scales, smooth = tensors
    w8 = int8_weight_ref(qweight, qzeros, qscales, group_size)
    assert torch.equal(w8.long(), u[gk] * (q - z[gk]))
    dense = dense_weight_ref(*tensors, group_size).double()
    expect = w8.double() * scales.double()[None, :] / smooth.double()[:, None]
    torch.testing.assert_close(dense, expect, rtol=1e-6, atol=0)

    x = torch.randn(7, k, generator=g, dtype=torch.float64) * 3
    x[2] = 0                                                     # an all-zero token
    x[3, 5] = 80                                                 # an outlier
    bias = torch.randn(n, generator=g)
    y = dgq_linear_ref(x.float(), *tensors, group_size, bias)
    xs = x / smooth.double()
    s_tok = xs.abs().amax(1).clamp(min=1e-10) / 127
    x8 = (xs / s_tok[:, None]).round().clamp(-127, 127)         # ties are measure-zero here
    oracle = (x8 @ w8.double()) * s_tok[:, None] * scales.double() + bias.double()
    torch.testing.assert_close(y.double(), oracle, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[2], bias)


def test_activation_quantization_rounds_half_away_and_saturates():
    assert round_half_away(torch.tensor([0.5, -0.5, 1.5, -2.5, 0.49, 2.0])).tolist() == \
        [1.0, -1.0, 2.0, -3.0, 0.0, 2.0]
    x = torch.tensor([[127.0, 63.5, -63.5, 0.2, -127.0]])
    x8, s = quantize_activations_ref(x, torch.ones(5))
    assert s.item() == 1.0 and x8.tolist() == [[127, 64, -64, 0, -127]]
    x8, s = quantize_activations_ref(torch.tensor([[8.0, -2.0]]), torch.tensor([2.0, 1.0]))
    assert x8.tolist() == [[127, -64]] and s.item() == pytest.approx(4 / 127)


def test_bad_shapes_are_rejected():
    g = torch.Generator().manual_seed(0)
    (qweight, qzeros, qscales, scales, smooth), _ = random_dgq(g, 64, 16, 32)
    with pytest.raises(ValueError, match="qzeros"):
        check_shapes(qweight, qzeros[:1], qscales, scales, smooth, 32)
    with pytest.raises(ValueError, match="qscales"):
        check_shapes(qweight, qzeros, qscales.to(torch.uint8), scales, smooth, 32)
    with pytest.raises(ValueError, match="qweight"):
        check_shapes(qweight[:3], qzeros, qscales, scales, smooth, 32)
    with pytest.raises(ValueError, match="group_size"):
        check_shapes(qweight, qzeros, qscales, scales, smooth, 0)
    bad = qscales.clone()
    bad[0, 0] = 127
    codes = torch.zeros(64, 16, dtype=torch.long)
    codes[0, 0] = 15
    with pytest.raises(ValueError, match="leaves"):
        int8_weight_ref(pack_codes(codes), torch.zeros_like(qzeros), bad, 32)


def _to(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("m,k", [(1, 40), (9, 3000), (4, 2048)])
@pytest.mark.parametrize("max_block", [16384, 1024])   # rows read once, or in two passes
def test_triton_activation_quantization_is_bit_exact(m, k, max_block):
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10).to(DTYPE)
    x[0, k // 2] = 500                                # outlier
    if m > 2:
        x[1] = 0
    smooth = (1 + torch.rand(k, generator=g) * 4).half()
    x, smooth = _to(DEVICE, x, smooth)
    x8, s = quantize_activations_triton(x, smooth, max_block)
    x8_ref, s_ref = quantize_activations_ref(x, smooth)
    assert torch.equal(s, s_ref) and torch.equal(x8, x8_ref)


CASES = [  # (M, K, N, group_size): aligned slices, ragged groups, one group, odd M and N
    (5, 96, 40, 32), (17, 200, 24, 48), (3, 64, 72, -1), (1, 256, 48, 128), (33, 136, 8, 8)]


@pytest.mark.parametrize("m,k,n,group_size", CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_gemm_matches_reference(m, k, n, group_size, with_bias):
    g = torch.Generator().manual_seed(m * k + n)
    tensors, _ = random_dgq(g, k, n, group_size)
    tensors = _to(DEVICE, *tensors)
    x = (torch.randn(m, k, generator=g) * 2).to(DEVICE, DTYPE)
    bias = torch.randn(n, generator=g).to(DEVICE, DTYPE) if with_bias else None
    qweight, qzeros, qscales, scales, smooth = tensors
    expect = dgq_linear_ref(x, *tensors, group_size, bias)
    x8, s_tok = quantize_activations_triton(x, smooth)
    for split_k in (None, 3, 3):     # the default, then split-K twice (its locks reset)
        out = torch.full((m, n), float("nan"), dtype=DTYPE, device=DEVICE)
        gemm_triton(x8, s_tok, qweight, qzeros, qscales, scales, group_size, bias, out,
                    split_k=split_k)
        _assert_same(out, expect, with_bias)
    w8 = dequantize_int8_triton(qweight, qzeros, qscales, group_size)
    assert w8.shape == (k, n) and w8.stride() == (1, k)     # K-major, for torch._int_mm
    assert torch.equal(w8, int8_weight_ref(qweight, qzeros, qscales, group_size))
    if m > 16:   # torch._int_mm's own limit on CUDA; on CPU it runs any shape
        _assert_same(int_mm_path(x8, s_tok, w8, scales, bias, DTYPE), expect, with_bias)


def _assert_same(out: torch.Tensor, expect: torch.Tensor, with_bias: bool) -> None:
    if GPU and with_bias:   # a fused multiply-add may skip the rounding before the bias add
        torch.testing.assert_close(out, expect, rtol=2e-3, atol=2e-3)
    else:
        assert torch.equal(out, expect)


def test_int8_dot_is_exact_past_float32_precision():
    """Every product at +-127 * 127 over K = 2048: sums near 3.3e7 > 2**24, where a float32
    accumulator would round; the int32 result must be exact."""
    g = torch.Generator().manual_seed(5)
    k, n, m = 2048, 16, 16
    tensors, (q, z, u, gk) = random_dgq(g, k, n, 128, extreme=True)
    tensors = _to(DEVICE, *tensors)
    qweight, qzeros, qscales, scales, _ = tensors
    smooth = torch.ones(k, dtype=torch.float16, device=DEVICE)
    x = torch.where(torch.rand(m, k, generator=g) < 0.9, 1.0, -1.0).to(DEVICE, DTYPE)
    x8, s_tok = quantize_activations_triton(x, smooth)
    acc = x8.long().cpu() @ (u[gk] * (q - z[gk]))
    assert acc.abs().max() > 2 ** 24
    out = torch.full((m, n), float("nan"), dtype=torch.float32, device=DEVICE)
    ones = torch.ones(n, dtype=torch.float16, device=DEVICE)
    gemm_triton(x8, torch.ones_like(s_tok), qweight, qzeros, qscales, ones, 128, None, out)
    assert torch.equal(out.cpu(), acc.float())


def test_dispatch_runs_triton_and_reference_alike(monkeypatch):
    g = torch.Generator().manual_seed(11)
    tensors = _to(DEVICE, *random_dgq(g, 128, 32, 64)[0])
    x = torch.randn(6, 128, generator=g).to(DEVICE, DTYPE)
    monkeypatch.setenv("OPTGPTQ_KERNELS", "reference")
    expect = ops.dgq_linear(x, *tensors, 64)
    monkeypatch.setenv("OPTGPTQ_KERNELS", "triton")
    assert torch.equal(ops.dgq_linear(x, *tensors, 64), expect)
