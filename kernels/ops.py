"""The one dispatch point between the engine and its kernels.

Models call only these functions. Each picks the implementation for the tensors it is given;
today every op runs its PyTorch reference, which works on CPU and on any accelerator that
PyTorch drives (CUDA, ROCm, Hygon DCU through torch.cuda).
"""

from __future__ import annotations

import torch

from optgptq_kernels.kv_write import write_kv_ref
from optgptq_kernels.paged_attention import paged_attention_ref


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new K/V rows into the paged cache (see :mod:`optgptq_kernels.kv_write`)."""
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal varlen attention over the paged cache (see :mod:`optgptq_kernels.paged_attention`)."""
    return paged_attention_ref(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, alibi_slopes
    )
