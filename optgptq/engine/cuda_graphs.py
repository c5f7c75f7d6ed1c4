"""CUDA graphs of decode steps: one replay instead of hundreds of Python-issued launches.

A decode step (every sequence adds one token) runs the same kernels whatever the tokens,
positions and block tables are, so its forward pass is captured once per batch-size bucket and
replayed with new inputs copied into static buffers. On a GPU the eager step is bound by the
host issuing ~10 kernels per layer; the replay leaves the device the only limit.

- Buckets: 1, 2, 4, 8, then every multiple of 8 up to ``max_num_seqs``; a batch of ``n``
  sequences replays the smallest bucket that holds it. Buckets are captured largest first and
  share one memory pool.
- Padding rows (``n`` .. bucket) get token 0 at position 0, cache slot -1 (the KV write skips
  it) and a one-token context in whatever block their table row names; their outputs are
  dropped.
- Attention is captured with the longest context the model allows (``max_model_len``), so one
  graph serves every length: that bound only fixes the decode kernel's number of partitions,
  and each sequence divides its own keys among them.

Prefill and mixed steps run eagerly, and so does everything where the kernels are the PyTorch
references (the CPU, ``OPTGPTQ_KERNELS=reference``), which synchronise with the host.
"""

from __future__ import annotations

import torch
from torch import nn

from optgptq.models.layers import AttentionMetadata


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes captured: 1, 2, 4, 8, 16, 24, ... up to ``max_num_seqs`` (included)."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    """The captured decode graphs of one model and its KV cache."""

    def __init__(self, model: nn.Module, device: torch.device, max_num_seqs: int,
                 max_model_len: int, block_size: int) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.sizes = bucket_sizes(max_num_seqs)
        n, width = self.sizes[-1], -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.starts = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.tables = torch.zeros((n, width), dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture()

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(positions=self.positions[:size], slot_mapping=self.slots[:size],
                                 query_start_loc=self.starts[:size + 1],
                                 seq_lens=self.seq_lens[:size], block_tables=self.tables[:size],
                                 max_query_len=1, max_seq_len=self.max_model_len)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):
            meta = self._meta(size)
            for _ in range(2):  # compile kernels, cache per-weight layouts, size buffers
                self.model(self.input_ids[:size], meta)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model(self.input_ids[:size], meta)
            pool = graph.pool()
            self.graphs[size] = (graph, hidden)
        torch.cuda.synchronize()

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            seq_lens: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Hidden states of ``n`` decode tokens (inputs on the host or the device; ``tables``
        ``[n, w]`` with ``w`` at most the model's blocks per sequence)."""
        n, w = tables.shape
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slots[:n].copy_(slots, non_blocking=True)
        self.slots[n:size].fill_(-1)
        self.seq_lens[:n].copy_(seq_lens, non_blocking=True)
        self.seq_lens[n:size].fill_(1)
        self.tables[:n, :w].copy_(tables, non_blocking=True)
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:n]
