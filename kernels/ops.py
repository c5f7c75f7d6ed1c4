"""The one dispatch point between the engine and its kernels.

Models call only these functions. Each picks, per call, the Triton kernel or its PyTorch
reference:

- ``OPTGPTQ_KERNELS=auto`` (default): Triton for tensors on an accelerator (CUDA, ROCm, Hygon DCU
  through ``torch.cuda``) when Triton imports; on float32 CPU tensors the native CPU kernels of
  :mod:`optgptq_kernels.cpu_native` (paged attention's decode rows, the pointwise steps, the KV
  write, GPTQ products: :mod:`optgptq_kernels.gptq_cpu`) where they build; the reference
  otherwise.
- ``OPTGPTQ_KERNELS=reference``: always the reference.
- ``OPTGPTQ_KERNELS=triton``: always Triton; with ``TRITON_INTERPRET=1`` (set before Triton is
  imported) the kernels run in Triton's interpreter on CPU tensors, which is how CI tests them.

The Triton modules are imported on first use, so a machine without Triton runs the references.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from optgptq_kernels import cpu_native, gptq_cpu, paged_attention_cpu
from optgptq_kernels.bcq import bcq_linear_ref
from optgptq_kernels.dgq import dgq_linear_ref
from optgptq_kernels.gptq import gptq_linear_ref
from optgptq_kernels.kv_write import write_kv_ref
from optgptq_kernels.paged_attention import paged_attention_ref
from optgptq_kernels.pointwise import add_rms_norm_ref, rotary_ref, silu_and_mul_ref

_MODES = ("auto", "reference", "triton")


@functools.cache
def _triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _mode() -> str:
    mode = os.environ.get("OPTGPTQ_KERNELS", "auto")
    if mode not in _MODES:
        raise ValueError(f"OPTGPTQ_KERNELS={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def use_triton(t: torch.Tensor) -> bool:
    """Whether ops on tensor ``t`` run the Triton kernels under the current mode."""
    mode = _mode()
    if mode == "reference":
        return False
    if mode == "triton":
        if not _triton_available():
            raise ValueError("OPTGPTQ_KERNELS=triton but Triton is not installed "
                             "(pip install 'optgptq[kernels]')")
        return True
    return t.is_cuda and _triton_available()


def native_cpu(t: torch.Tensor) -> bool:
    """Whether ops on tensor ``t`` run the native CPU kernels (float32 CPU tensors in ``auto``
    mode, where they build; the first call builds them)."""
    return (t.device.type == "cpu" and t.dtype == torch.float32 and _mode() == "auto"
            and cpu_native.available())


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` (see :mod:`optgptq_kernels.pointwise`)."""
    if use_triton(x) and x.dim() == 2 and x.stride(1) == 1:
        from optgptq_kernels.pointwise_triton import add_rms_norm_triton

        return add_rms_norm_triton(x, weight, eps, residual)
    if (native_cpu(x) and x.dim() == 2 and x.stride(1) == 1 and weight.dtype == torch.float32
            and (residual is None or residual.dtype == torch.float32 and residual.stride(1) == 1)):
        out, total = cpu_native.ops().add_rms_norm(x, residual, weight, eps)
        return out, (x if residual is None else total)
    return add_rms_norm_ref(x, weight, eps, residual)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor, num_heads: int, num_kv_heads: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q [T, H*D] and k [T, Hkv*D] (see :mod:`optgptq_kernels.pointwise`)."""
    if use_triton(q):
        from optgptq_kernels.pointwise_triton import rotary_triton

        return rotary_triton(positions, q, k, cos, sin, num_heads, num_kv_heads)
    if (native_cpu(q) and k.dtype == cos.dtype == sin.dtype == torch.float32 and q.dim() == 2
            and q.stride(1) == 1 and k.stride(1) == 1):
        return cpu_native.ops().rotary(positions, q, k, cos, sin, num_heads, num_kv_heads)
    return rotary_ref(positions, q, k, cos, sin, num_heads, num_kv_heads)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (see :mod:`optgptq_kernels.pointwise`)."""
    if (use_triton(gate) and gate.dim() == 2 and gate.stride(1) == 1 and up.stride(1) == 1
            and gate.shape == up.shape):
        from optgptq_kernels.pointwise_triton import silu_and_mul_triton

        return silu_and_mul_triton(gate, up)
    if (native_cpu(gate) and up.dtype == torch.float32 and gate.dim() == 2
            and gate.stride(1) == 1 and up.stride(1) == 1 and gate.shape == up.shape):
        return cpu_native.ops().silu_and_mul(gate, up)
    return silu_and_mul_ref(gate, up)


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask for 2 MB pages behind a large CPU buffer (the KV pool) before its pages are first
    written (see ``memory_cpu.cpp``); whether the kernel accepted. Elsewhere (no native build,
    not a CPU tensor) nothing is asked and the answer is False."""
    if t.device.type == "cpu" and _mode() == "auto" and cpu_native.available():
        return cpu_native.ops().advise_huge_pages(t)
    return False


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight [out, in]`` packed for :func:`packed_linear` (``linear_cpu.cpp``), or None where
    that kernel does not run (not a float32 CPU tensor, no native build, no AVX-512)."""
    if native_cpu(weight) and cpu_native.ops().avx512_built():
        return cpu_native.ops().pack_linear_weight(weight)
    return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [rows, in] @ W^T + bias`` for a weight packed by :func:`pack_linear_weight`."""
    return cpu_native.ops().packed_linear(x, packed, out_features, bias)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows into the paged cache (see :mod:`optgptq_kernels.kv_write`)."""
    if use_triton(k):
        from optgptq_kernels.kv_write_triton import write_kv_triton

        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    elif (native_cpu(k) and v.dtype == k_cache.dtype == v_cache.dtype == torch.float32
          and k.stride(2) == 1 and v.stride(2) == 1):
        cpu_native.ops().write_kv(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_ref(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float,
                    alibi_slopes: torch.Tensor | None = None,
                    max_query_len: int | None = None, max_seq_len: int | None = None,
                    ) -> torch.Tensor:
    """Causal varlen attention over the paged cache (see :mod:`optgptq_kernels.paged_attention`).

    ``max_query_len`` and ``max_seq_len`` are the batch's longest query chunk and context, known
    to the caller on the host; the Triton path sizes its grid from them (computing them here
    would synchronise with the device).
    """
    if use_triton(q):
        from optgptq_kernels.paged_attention_triton import paged_attention_triton

        if max_query_len is None or max_seq_len is None:
            q_lens = query_start_loc[1:] - query_start_loc[:-1]
            max_query_len, max_seq_len = int(q_lens.max()), int(seq_lens.max())
        return paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens,
                                      query_start_loc, scale, alibi_slopes,
                                      max_query_len, max_seq_len)
    if native_cpu(q) and k_cache.dtype == v_cache.dtype == torch.float32:
        return paged_attention_cpu.paged_attention_cpu(q, k_cache, v_cache, block_tables,
                                                       seq_lens, query_start_loc, scale,
                                                       alibi_slopes)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                               scale, alibi_slopes)


def gptq_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W + bias`` for a GPTQ-packed ``W`` (layout in :mod:`optgptq_kernels.gptq`)."""
    if use_triton(x):
        from optgptq_kernels.gptq_triton import gptq_linear_triton

        return gptq_linear_triton(x, qweight, qzeros, scales, g_idx, bits, bias)
    if native_cpu(x) and x.dim() == 2:  # repacked per call: layers keep theirs (pack_gptq_weight)
        return gptq_cpu.gptq_cpu_linear(
            x, gptq_cpu.pack_gptq_cpu(qweight, qzeros, scales, g_idx, bits, _gptq_act_pieces()),
            bias)
    return gptq_linear_ref(x, qweight, qzeros, scales, g_idx, bits, bias)


def _gptq_act_pieces() -> int:
    """INT8 pieces per activation of the native CPU GPTQ kernel: ``OPTGPTQ_CPU_GPTQ_ACT=int8``
    (default, 1) or ``int16`` (2: about 16 bits, within ~3e-5 of the float product; see
    :mod:`optgptq_kernels.gptq_cpu`)."""
    act = os.environ.get("OPTGPTQ_CPU_GPTQ_ACT", "int8")
    if act not in ("int8", "int16"):
        raise ValueError(f"OPTGPTQ_CPU_GPTQ_ACT={act!r}: expected int8 or int16")
    return 1 if act == "int8" else 2


def pack_gptq_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                     g_idx: torch.Tensor, bits: int) -> gptq_cpu.PackedGPTQ | None:
    """A GPTQ weight repacked once for :func:`packed_gptq_linear` (``gptq_cpu.cpp``), or None
    where that kernel does not run (tensors not on the CPU, not ``auto`` mode, no native build)."""
    if qweight.device.type == "cpu" and _mode() == "auto" and cpu_native.available():
        return gptq_cpu.pack_gptq_cpu(qweight, qzeros, scales, g_idx, bits, _gptq_act_pieces())
    return None


def packed_gptq_linear(x: torch.Tensor, packed: gptq_cpu.PackedGPTQ,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [rows, K] @ W + bias`` (float32) for a weight packed by :func:`pack_gptq_weight`."""
    return gptq_cpu.gptq_cpu_linear(x, packed, bias)


def dgq_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
               qscales: torch.Tensor, scales: torch.Tensor, smooth: torch.Tensor,
               group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A8W4 ``x @ W + bias`` for a DGQ weight (layout and numerics in :mod:`optgptq_kernels.dgq`):
    per-token INT8 activations times INT8-dequantized INT4 weights in one integer GEMM."""
    if use_triton(x):
        from optgptq_kernels.dgq_triton import dgq_linear_triton

        return dgq_linear_triton(x, qweight, qzeros, qscales, scales, smooth, group_size, bias)
    return dgq_linear_ref(x, qweight, qzeros, qscales, scales, smooth, group_size, bias)


def bcq_linear(x: torch.Tensor, planes: torch.Tensor, alphas: torch.Tensor,
               offsets: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W + bias`` for a binary-coded ``W`` (layout in :mod:`optgptq_kernels.bcq`)."""
    if use_triton(x):
        from optgptq_kernels.bcq_triton import bcq_linear_triton

        return bcq_linear_triton(x, planes, alphas, offsets, group_size, bias)
    return bcq_linear_ref(x, planes, alphas, offsets, group_size, bias)
