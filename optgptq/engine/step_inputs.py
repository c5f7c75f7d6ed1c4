"""A step's flat model inputs, built on the host from a scheduled batch.

Every scheduled sequence contributes its new tokens in order: their ids, positions and KV cache
slots (``block_table[p // block_size] * block_size + p % block_size``), its context length, and
its block table as one row of a ``[num_seqs, width]`` matrix. A sequence whose last token is
among them is sampled: the hidden state of its last row gets logits.

The block-table matrix is the costly part to rebuild (a decode batch of 256 sequences 700
tokens long holds ~11k block ids, 1.7 ms through ``torch.tensor`` on the host), so it lives in
one persistent host buffer whose row ``i`` is written only when another sequence sits in row
``i`` than in the last step, or the same sequence's table grew, and then only its new entries.
That is exact because a table only grows by appending: a sequence whose blocks were freed
(preempted, finished, aborted) sits out at least one step, so its row changes hands first.
A decode step thus writes about one row in ``block_size``. Entries past a sequence's table are
left over from earlier occupants and never read (a sequence's kernels stop at its length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optgptq.engine.scheduler import ScheduledBatch
from optgptq.engine.sequence import Sequence


@dataclass
class StepInputs:
    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    query_starts: list[int]      # cumulative new tokens, num_seqs + 1 entries
    seq_lens: list[int]          # context length after the step
    block_tables: torch.Tensor   # [num_seqs, width] int32 on the host (a view of the buffer)
    logits_rows: list[int]       # rows whose hidden states are sampled
    sampling: list[int]          # their sequences' batch indices

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token."""
        return len(self.input_ids) == len(self.seq_lens)


class StepInputBuilder:
    """Turns scheduled batches into :class:`StepInputs`, keeping the block-table buffer."""

    def __init__(self, block_size: int, max_num_seqs: int, max_blocks_per_seq: int) -> None:
        self.block_size = block_size
        self.tables = torch.zeros((max_num_seqs, max_blocks_per_seq), dtype=torch.int32)
        self._tables_np = self.tables.numpy()
        self._rows: list[tuple[Sequence, int]] = []  # (occupant, table entries written)

    def build(self, batch: ScheduledBatch) -> StepInputs:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        sampling: list[int] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            first = seq.num_computed_tokens
            table = seq.block_table
            if n == 1:
                input_ids.append(seq.token_ids[first])
                positions.append(first)
                slots.append(table[first // bs] * bs + first % bs)
            else:
                input_ids.extend(seq.token_ids[first:first + n])
                pos = range(first, first + n)
                positions.extend(pos)
                slots.extend(table[p // bs] * bs + p % bs for p in pos)
            starts.append(starts[-1] + n)
            seq_lens.append(first + n)
            if first + n == seq.num_tokens:
                logits_rows.append(starts[-1] - 1)
                sampling.append(i)
        width = self._write_tables(batch.seqs)
        return StepInputs(input_ids, positions, slots, starts, seq_lens,
                          self.tables[:len(batch.seqs), :width], logits_rows, sampling)

    def _write_tables(self, seqs: list[Sequence]) -> int:
        """Bring rows ``0 .. len(seqs)`` of the buffer up to date; returns the widest table."""
        rows, buf = self._rows, self._tables_np
        del rows[len(seqs):]
        width = 1
        for i, seq in enumerate(seqs):
            table = seq.block_table
            size = len(table)
            width = max(width, size)
            if i < len(rows):
                owner, written = rows[i]
                if owner is seq and written == size:
                    continue
                start = written if owner is seq and written < size else 0
                rows[i] = (seq, size)
            else:
                start = 0
                rows.append((seq, size))
            buf[i, start:size] = table[start:]
        return width
