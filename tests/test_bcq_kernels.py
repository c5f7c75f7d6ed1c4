"""The binary-coded Triton kernels (LUT-GEMM, bit-plane dot, dequantize) against their PyTorch
reference and a float64 oracle (the engine serving a GPTQT checkpoint through them is in
test_kernels.py, beside the other kernels' engine test).

Without an accelerator the kernels run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), in float32 and float16 on small odd shapes; with one, on the device at 16x
the input and 32x the output sizes in float16 and bfloat16. Outputs are poisoned with NaN first.
"""

from __future__ import annotations

import pytest
import torch

from optgptq_kernels import ops
from optgptq_kernels.bcq import bcq_linear_ref, dequantize_bcq_ref, num_groups, pack_planes

pytest.importorskip("triton", reason="Triton is not installed")

from optgptq_kernels.bcq_triton import bcq_linear_triton, dequantize_bcq_triton  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if GPU else [torch.float32, torch.float16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

CASES = [  # bits, K, N, group size: ragged last group (160 = 64 + 64 + 32), odd N, one group,
    (3, 160, 40, 64), (2, 96, 33, 32), (3, 128, 24, -1), (2, 256, 48, 96)]  # groups of 3 words
PATH_ROWS = [  # path, rows, column tile (None: the default)
    ("lut", 1, 16), ("lut", 3, None), ("dot", 5, 16), ("dot", 17, None), ("dense", 70, None)]


def _case(g: torch.Generator, bits: int, k: int, n: int, group_size: int):
    if GPU:
        k, n = k * 16, n * 32
    groups = num_groups(k, group_size)
    codes = torch.randint(0, 1 << bits, (k, n), generator=g)
    alphas = (torch.rand(groups, bits, n, generator=g) * 0.02 + 0.001).half()
    offsets = (torch.randn(groups, n, generator=g) * 0.01).half()
    return k, n, [t.to(DEVICE) for t in (pack_planes(codes, bits), alphas, offsets)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("bits,k,n,group_size", CASES)
def test_dequantize(bits, k, n, group_size):
    g = torch.Generator().manual_seed(k + n)
    _, _, tensors = _case(g, bits, k, n, group_size)
    for dtype in (torch.float32, torch.float16):
        assert torch.equal(dequantize_bcq_triton(*tensors, group_size, dtype),
                           dequantize_bcq_ref(*tensors, group_size, dtype))


@pytest.mark.parametrize("bits,k,n,group_size", CASES)
@pytest.mark.parametrize("path,m,block_n", PATH_ROWS)
def test_bcq_linear(bits, k, n, group_size, path, m, block_n):
    g = torch.Generator().manual_seed(bits * 1000 + k + m)
    k, n, tensors = _case(g, bits, k, n, group_size)
    w64 = dequantize_bcq_ref(*tensors, group_size, torch.float64)
    for dtype in DTYPES:
        x = torch.randn(m, k, generator=g).to(device=DEVICE, dtype=dtype)
        bias = torch.randn(n, generator=g).to(device=DEVICE, dtype=dtype)
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
        bcq_linear_triton(x, *tensors, group_size, bias, out=out, path=path, block_n=block_n)
        ref = x.double() @ w64 + bias.double()
        assert rel_err(out, ref) < TOLERANCE[dtype], dtype
        ref_op = bcq_linear_ref(x, *tensors, group_size, bias).double()
        assert rel_err(out, ref_op) < 2 * TOLERANCE[dtype], dtype


def test_split_k_and_dispatch(monkeypatch):
    """Long inputs split over programs; ``ops.bcq_linear`` picks the kernel by row count."""
    import optgptq_kernels.bcq_triton as bt

    monkeypatch.setattr(bt, "_num_programs", lambda device: 64)
    g = torch.Generator().manual_seed(5)
    k, n, tensors = _case(g, 3, 2048, 32, 128)
    w64 = dequantize_bcq_ref(*tensors, 128, torch.float64)
    launched = []
    for name in ("lut_gemm_kernel", "dot_gemm_kernel"):
        kernel = getattr(bt, name)
        monkeypatch.setattr(bt, name, _Spy(kernel, name, launched))
    monkeypatch.setenv("OPTGPTQ_KERNELS", "triton")
    for m in (1, 8):
        x = torch.randn(m, k, generator=g).to(DEVICE, DTYPES[0])
        assert rel_err(ops.bcq_linear(x, *tensors, 128), x.double() @ w64) < TOLERANCE[DTYPES[0]]
    assert [(name, split > 1) for name, split in launched] == [("lut_gemm_kernel", True),
                                                               ("dot_gemm_kernel", True)]


class _Spy:
    """Records each kernel that launched and its SPLIT_K."""

    def __init__(self, kernel, name: str, log: list) -> None:
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):  # logged once it launched: a tiling that runs out of
            result = self.kernel[grid](*args, **kwargs)  # shared memory is retried smaller
            self.log.append((self.name, kwargs["SPLIT_K"]))
            return result
        return launch


def test_bad_input_is_rejected():
    g = torch.Generator().manual_seed(1)
    _, _, tensors = _case(g, 2, 96, 16, 32)
    x = torch.randn(2, 64).to(DEVICE)
    with pytest.raises(ValueError, match="x has 64 features, the planes hold"):
        bcq_linear_triton(x, *tensors, 32)
    with pytest.raises(ValueError, match="do not match"):
        bcq_linear_triton(torch.randn(2, tensors[0].shape[1] * 32).to(DEVICE), *tensors, 64)
    with pytest.raises(ValueError, match="path must be one of"):
        bcq_linear_triton(torch.randn(2, tensors[0].shape[1] * 32).to(DEVICE), *tensors, 32,
                          path="lookup")
