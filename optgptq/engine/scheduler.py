"""Continuous batching with chunked prefill, FCFS admission and preemption by recompute.

Each step (``schedule``) builds one batch under a token budget (``max_num_batched_tokens``) and a
sequence cap (``max_num_seqs``):

1. Running sequences, oldest first, each get what they still need: one token when decoding, or
   the next chunk of a prompt being prefilled (capped by the budget left). When the pool has no
   block for one, the newest running sequence is preempted (its blocks freed, its progress reset
   to recompute later, requeued in arrival order, ahead of later arrivals) until the block fits;
   a sequence that is itself the newest preempts itself.
2. If nothing was preempted, waiting sequences are admitted in arrival order while the budget,
   the cap and the pool allow: prefix-cache hits first, then a first chunk of the rest. The head
   of the queue is never skipped, so no request starves behind later, smaller ones.

Long prompts therefore run in chunks mixed with other sequences' decodes. A sequence with choices
waiting to fork from it (``forks``, a request with ``n`` > 1) is admitted only while the cap has
room for them too, so that they join the running batch as soon as its prompt is computed
(:meth:`Scheduler.add_forked`). ``abort`` frees a request's blocks (all its choices') at once.
The engine guarantees that every admitted sequence fits the pool alone, so preemption always
makes progress.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from optgptq.engine.block_pool import BlockPool
from optgptq.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: sequences with their number of new tokens, and who was preempted."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # kept in arrival order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.pool.allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
        if batch.preempted:
            return batch
        seats = self.max_num_seqs - len(self.running) - sum(len(s.forks) for s in self.running)
        while self.waiting and budget > 0 and seats > len(self.waiting[0].forks):
            seq = self.waiting[0]
            hits = self.pool.find_prefix(seq)
            n = min(seq.num_tokens - len(hits) * self.pool.block_size, budget)
            if not self.pool.can_admit(seq, hits, n):
                break
            self.waiting.popleft()
            self.pool.admit(seq, hits)
            ok = self.pool.allocate(seq, n)
            assert ok, "can_admit promised room"
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            seats -= 1 + len(seq.forks)
        return batch

    def add_forked(self, seq: Sequence) -> None:
        """A choice just forked from a sequence of this batch: running if it got its blocks
        (:meth:`BlockPool.fork`), else waiting in its arrival place (it recomputes the prompt,
        as a preempted sequence does)."""
        if seq.block_table:
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
        else:
            bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)  # back in FCFS place

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (running, or a choice that just forked into the waiting queue): it
        leaves its queue and its blocks are freed (cached)."""
        (self.running if seq.status is SequenceStatus.RUNNING else self.waiting).remove(seq)
        self.pool.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, request_id: str) -> list[Sequence]:
        """Remove a request's sequences wherever they are; their blocks are freed at once."""
        found = []
        for queue in (self.running, self.waiting):
            for seq in [s for s in queue if s.request_id == request_id]:
                queue.remove(seq)
                self.pool.free(seq)
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "abort"
                found.append(seq)
        return found
