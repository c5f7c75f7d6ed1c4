"""KV cache write in Triton: one program per (token, KV head) copies a K row and a V row into
the token's slot. Same contract as :func:`optgptq_kernels.kv_write.write_kv_ref`; a negative
slot (a padding token) is skipped."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_ch, stride_cb, stride_cs, head_dim,
                     BLOCK_SIZE: tl.constexpr, D_PAD: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    d = tl.arange(0, D_PAD)
    dm = d < head_dim
    dst = h * stride_ch + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + d
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=dm)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=dm)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=dm)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=dm)


def write_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v [num_tokens, num_kv_heads, head_dim] -> caches [Hkv, num_blocks, block_size, D]."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.stride(3) == 1
    assert k_cache.stride() == v_cache.stride()
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens, num_kv_heads)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), head_dim,
        BLOCK_SIZE=k_cache.shape[2], D_PAD=triton.next_power_of_2(head_dim))
