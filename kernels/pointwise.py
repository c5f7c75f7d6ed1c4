"""A decoder layer's pointwise steps, each one kernel on an accelerator: residual add + RMSNorm,
rotary embedding of q and k, SiLU-and-multiply. These PyTorch references are the contract.

At batch 1 a layer's matrix products are a handful of kernels, while its pointwise steps, run
as separate torch ops (casts, powers, means, slices, concatenations), were some thirty more,
each one a launch over a few kilobytes. The Triton versions
(:mod:`optgptq_kernels.pointwise_triton`) do each step in one launch.

Every step is specified in the order and precision that transformers' Llama uses, so the
reference path reproduces transformers' outputs:

- ``add_rms_norm``: ``s = x + residual`` in ``x``'s dtype (that sum is the next residual), then
  ``weight * (float32(s) * rsqrt(mean(float32(s)^2) + eps)).to(dtype)``;
- ``rotary``: ``c = cos[pos].to(dtype)``, ``s = sin[pos].to(dtype)``,
  ``q * c + rotate_half(q) * s`` with each product and the sum rounded to the dtype, where
  ``rotate_half(q) = cat(-q[half:], q[:half])`` within each head (the same for k);
- ``silu_and_mul``: ``silu(gate) * up``, each rounded to the dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     residual: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual), x + residual)`` over the last dimension; without ``residual``,
    ``(norm(x), x)``."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, num_heads: int, num_kv_heads: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates ``q [T, H*D]`` and ``k [T, Hkv*D]`` by the rows ``positions [T]`` of the float32
    tables ``cos, sin [max_positions, D]``."""
    t = q.shape[0]
    c = cos[positions].to(q.dtype).unsqueeze(1)
    s = sin[positions].to(q.dtype).unsqueeze(1)
    q = q.view(t, num_heads, -1)
    k = k.view(t, num_kv_heads, -1)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    return q.reshape(t, -1), k.reshape(t, -1)


def silu_and_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
