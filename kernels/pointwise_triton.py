"""The pointwise steps of :mod:`optgptq_kernels.pointwise` in Triton, one launch each: a row
per program for the norm, a token per program (all its q and k heads) for the rotary
embedding, a flat block per program for SiLU-and-multiply. Each rounds to the dtype where the
reference does, so they differ from it only where ``rsqrt`` and ``exp`` do."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, N, eps, stride_x, stride_r,
                         stride_o, stride_s, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * stride_s + offs, x, mask=mask)
    h = x.to(tl.float32)
    h = h * tl.math.rsqrt(tl.sum(h * h, 0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = w * h.to(x.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                        residual: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`optgptq_kernels.pointwise.add_rms_norm_ref`, for ``x [T, N]``."""
    t, n = x.shape
    assert x.stride(1) == 1 and weight.is_contiguous()
    if residual is not None and residual.stride(1) != 1:  # rows are read with one stride
        residual = residual.contiguous()
    out = torch.empty((t, n), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    total = x.new_empty((t, n)) if residual is not None else x
    if t:
        block = triton.next_power_of_2(n)
        _add_rms_norm_kernel[(t,)](x, residual if residual is not None else x, weight, out,
                                   total, n, eps, x.stride(0),
                                   residual.stride(0) if residual is not None else 0,
                                   out.stride(0), total.stride(0),
                                   HAS_RESIDUAL=residual is not None, BLOCK=block,
                                   num_warps=max(1, min(16, block // 256)))
    return out, total


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, stride_src, stride_dst, t, heads, half, c1, c2, s1, s2,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotates ``heads`` heads of token ``t``: ``x1 c1 - x2 s1`` and ``x2 c2 + x1 s2``, each
    product and sum rounded to the dtype (``c*``, ``s*`` already rounded to it, float32)."""
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h < heads)[:, None] & (d < half)[None, :]
    col = h[:, None] * (2 * half) + d[None, :]
    x1 = tl.load(src_ptr + t * stride_src + col, mask=mask, other=0.0)
    x2 = tl.load(src_ptr + t * stride_src + col + half, mask=mask, other=0.0)
    dt = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    o1 = (a1 * c1[None, :]).to(dt).to(tl.float32) + (-a2 * s1[None, :]).to(dt).to(tl.float32)
    o2 = (a2 * c2[None, :]).to(dt).to(tl.float32) + (a1 * s2[None, :]).to(dt).to(tl.float32)
    tl.store(dst_ptr + t * stride_dst + col, o1.to(dt), mask=mask)
    tl.store(dst_ptr + t * stride_dst + col + half, o2.to(dt), mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, stride_q, stride_k,
                   stride_qo, stride_ko, stride_tab, num_heads, num_kv_heads, half,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    row = tl.load(pos_ptr + t).to(tl.int64) * stride_tab
    d = tl.arange(0, BLOCK_D)
    dm = d < half
    dt = qo_ptr.dtype.element_ty
    c1 = tl.load(cos_ptr + row + d, mask=dm, other=0.0).to(dt).to(tl.float32)
    c2 = tl.load(cos_ptr + row + half + d, mask=dm, other=0.0).to(dt).to(tl.float32)
    s1 = tl.load(sin_ptr + row + d, mask=dm, other=0.0).to(dt).to(tl.float32)
    s2 = tl.load(sin_ptr + row + half + d, mask=dm, other=0.0).to(dt).to(tl.float32)
    _rotate_heads(q_ptr, qo_ptr, stride_q, stride_qo, t, num_heads, half, c1, c2, s1, s2,
                  BLOCK_H, BLOCK_D)
    _rotate_heads(k_ptr, ko_ptr, stride_k, stride_ko, t, num_kv_heads, half, c1, c2, s1, s2,
                  BLOCK_H, BLOCK_D)


def rotary_triton(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, num_heads: int, num_kv_heads: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`optgptq_kernels.pointwise.rotary_ref`."""
    t = q.shape[0]
    head_dim = q.shape[1] // num_heads
    assert q.stride(1) == 1 and k.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if t:
        half = head_dim // 2
        _rotary_kernel[(t,)](positions, q, k, cos, sin, q_out, k_out, q.stride(0), k.stride(0),
                             q_out.stride(0), k_out.stride(0), cos.stride(0), num_heads,
                             num_kv_heads, half,
                             BLOCK_H=triton.next_power_of_2(max(num_heads, num_kv_heads)),
                             BLOCK_D=triton.next_power_of_2(half))
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(g_ptr, u_ptr, out_ptr, n, stride_g, stride_u, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0)
    u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    a = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(out_ptr + row * n + offs, (a.to(tl.float32) * u.to(tl.float32)).to(g.dtype),
             mask=mask)


def silu_and_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """As :func:`optgptq_kernels.pointwise.silu_and_mul_ref`, for ``[T, I]`` inputs whose rows
    may be strided (the two halves of a merged gate/up product)."""
    assert gate.dim() == 2 and gate.shape == up.shape
    assert gate.stride(1) == 1 and up.stride(1) == 1
    t, n = gate.shape
    out = torch.empty((t, n), dtype=gate.dtype, device=gate.device)
    if t and n:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(t, triton.cdiv(n, block))](gate, up, out, n, gate.stride(0),
                                                         up.stride(0), BLOCK=block)
    return out
