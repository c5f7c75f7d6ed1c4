"""Merging a group's K/V heads into one, and refitting the output projection afterwards.

All weights are per-head stacks ``W_h [in + 1, D]`` (last row: bias), activations ``x W_h``.

``mean``: ``W' = mean_h W_h`` (the GQA paper's mean pooling).

``lstsq``: least squares on the calibration activations, aimed at the attention output rather
than at the K/V activations themselves (fitting ``X W'`` to the mean of ``X W_h`` just gives
back the mean weights, so that target would add nothing):

- Keys minimise the error of the attention logits the group's queries compute,
  ``sum_h E[(q_h . (k' - k_h))^2]``. With queries independent of the key error this is
  ``sum_h trace(E_h^T G E_h C_h)`` for ``E_h = W' - W_h``, ``G = X^T X`` and the query second
  moment ``C_h = E[q_h q_h^T]``, minimised by ``W' = (sum_h W_h C_h)(sum_h C_h)^-1``: a
  query-weighted mean that keeps each head's key dimensions where its queries look. Under
  RoPE the query and key of a logit are rotated by different angles, so ``C_h`` is averaged
  over rotations: a diagonal holding, for both dimensions of each rotary pair, half the
  pair's query energy (cross terms average out between frequencies and cancel inside a pair).
- Values minimise the error after each head's slice ``O_h [D, hidden]`` of the output
  projection, ``sum_h ||X (W' - W_h) O_h||^2``, minimised by
  ``W' = (sum_h W_h M_h)(sum_h M_h)^-1`` with ``M_h = O_h O_h^T``.
- Then the output projection, whose columns belong to single query heads and so are free, is
  refitted layer by layer (inputs propagated through the already converted layers) so that
  the converted attention reproduces the original attention output on the calibration
  tokens: ``min ||Z' (O + D) - Y||^2 + lambda ||D||^2`` with ``Z'`` the converted per-head
  outputs (and a ones column for the bias), ``Y`` the original layer's output projection,
  ``lambda = DAMP * mean(diag(Z'^T Z'))``. Ridge toward the current weights keeps an exact
  conversion exact (zero residual gives ``D = 0``).

Every merge is computed as ``W_0 + combination(W_h - W_0)``, so a group of identical heads
merges to exactly that head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DAMP = 1e-2


def mean_merge(stacks: torch.Tensor) -> torch.Tensor:
    """``[g, in + 1, D]`` -> ``[in + 1, D]``."""
    return stacks[0] + (stacks - stacks[0]).mean(0)


def weighted_merge(stacks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``W' = (sum_h W_h C_h)(sum_h C_h)^-1`` for ``stacks [g, in + 1, D]``, ``weights [g, D, D]``."""
    total = weights.sum(0).double()
    total = total + 1e-8 * total.diagonal().mean().clamp_min(1e-30) * torch.eye(total.shape[0],
                                                                                 dtype=total.dtype)
    diff = (stacks - stacks[0]).double()
    num = torch.einsum("gid,gde->ie", diff, weights.double())
    return stacks[0] + torch.linalg.solve(total, num.T).T.to(stacks.dtype)


def rope_query_weights(query_moment: torch.Tensor) -> torch.Tensor:
    """Rotation-averaged query second moments ``[g, D, D]`` -> diagonal ``[g, D, D]``
    (rotate-half RoPE pairs dimension ``i`` with ``i + D/2``)."""
    energy = query_moment.diagonal(dim1=1, dim2=2)
    half = energy.shape[1] // 2
    pair = (energy[:, :half] + energy[:, half:]) / 2
    return torch.diag_embed(torch.cat([pair, pair], dim=1))


def output_weights(out_weight: torch.Tensor, heads: list[int], head_dim: int) -> torch.Tensor:
    """``M_h = O_h O_h^T`` ``[g, D, D]`` from an output projection weight ``[hidden, H*D]``."""
    slices = torch.stack([out_weight[:, h * head_dim:(h + 1) * head_dim].float() for h in heads])
    return slices.transpose(1, 2) @ slices


class OutProjFit:
    """Accumulates ``Z'^T Z'`` and ``Z'^T R`` over batches, then solves the ridge update."""

    def __init__(self, proj: torch.nn.Linear) -> None:
        self.proj = proj
        n = proj.in_features + (proj.bias is not None)
        self.zz = torch.zeros(n, n, dtype=torch.float64)
        self.zr = torch.zeros(n, proj.out_features, dtype=torch.float64)

    def add(self, z: torch.Tensor, target: torch.Tensor) -> None:
        """``z [..., in]`` the converted heads' outputs, ``target [..., out]`` the original output."""
        z = z.reshape(-1, z.shape[-1]).double()
        current = F.linear(z.to(self.proj.weight.dtype), self.proj.weight, self.proj.bias)
        residual = target.reshape(-1, target.shape[-1]).double() - current.double()
        if self.proj.bias is not None:
            z = torch.cat([z, z.new_ones(z.shape[0], 1)], dim=1)
        self.zz += z.T @ z
        self.zr += z.T @ residual

    @torch.no_grad()
    def apply(self) -> None:
        lam = DAMP * self.zz.diagonal().mean().clamp_min(1e-30)
        delta = torch.linalg.solve(self.zz + lam * torch.eye(self.zz.shape[0], dtype=self.zz.dtype),
                                   self.zr)
        n = self.proj.in_features
        self.proj.weight += delta[:n].T.to(self.proj.weight.dtype)
        if self.proj.bias is not None:
            self.proj.bias += delta[n].to(self.proj.bias.dtype)
