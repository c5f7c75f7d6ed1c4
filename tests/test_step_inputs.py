"""Step inputs: flat ids, positions and slots, and the block-table buffer whose rows are only
rewritten when their occupant or its table changed — checked against a fresh build every step
of a random workload with preemption, aborts and finishing sequences."""

import random

from optgptq.engine.block_pool import BlockPool
from optgptq.engine.sampling_params import SamplingParams
from optgptq.engine.scheduler import Scheduler
from optgptq.engine.sequence import Sequence
from optgptq.engine.step_inputs import StepInputBuilder

BS = 4


def _expected(batch):
    """What a step's inputs must be, recomputed from scratch."""
    ids, pos, slots, lens, tables, rows = [], [], [], [], [], []
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        first = s.num_computed_tokens
        for p in range(first, first + n):
            ids.append(s.token_ids[p])
            pos.append(p)
            slots.append(s.block_table[p // BS] * BS + p % BS)
        lens.append(first + n)
        tables.append(list(s.block_table))
        if first + n == s.num_tokens:
            rows.append(len(ids) - 1)
    return ids, pos, slots, lens, tables, rows


def test_decode_and_prefill_rows():
    pool = BlockPool(32, BS, enable_prefix_caching=False)
    sched = Scheduler(pool, 4, 16)
    a = Sequence("a", [11, 12, 13, 14, 15, 16], SamplingParams(), 0, max_tokens=8)
    b = Sequence("b", [21, 22, 23], SamplingParams(), 1, max_tokens=8)
    sched.add(a)
    sched.add(b)
    builder = StepInputBuilder(BS, 4, 8)
    inp = builder.build(sched.schedule())
    assert inp.input_ids == [11, 12, 13, 14, 15, 16, 21, 22, 23]
    assert inp.positions == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert inp.slots == [0, 1, 2, 3, 4, 5, 8, 9, 10]      # a: blocks 0, 1; b: block 2
    assert inp.query_starts == [0, 6, 9] and inp.seq_lens == [6, 3]
    assert inp.block_tables.tolist() == [[0, 1], [2, 0]]
    assert inp.logits_rows == [5, 8] and inp.sampling == [0, 1] and not inp.is_decode


def test_table_rows_follow_a_random_workload():
    rng = random.Random(0)
    pool = BlockPool(24, BS, enable_prefix_caching=True)
    sched = Scheduler(pool, 6, 12)
    builder = StepInputBuilder(BS, 6, 16)
    live: list[Sequence] = []
    arrivals = 0
    steps_with_preemption = rewritten_rows = 0
    for _ in range(400):
        if rng.random() < 0.3 and arrivals < 60:
            prompt = [rng.randrange(50) for _ in range(rng.randint(1, 20))]
            s = Sequence(f"r{arrivals}", prompt, SamplingParams(), arrivals,
                         max_tokens=rng.randint(1, 24))
            sched.add(s)
            live.append(s)
            arrivals += 1
        if live and rng.random() < 0.05:
            victim = live.pop(rng.randrange(len(live)))
            sched.abort(victim.request_id)
        batch = sched.schedule()
        steps_with_preemption += bool(batch.preempted)
        if not batch:
            continue
        before = [row for row in builder._rows]
        inp = builder.build(batch)
        ids, pos, slots, lens, tables, rows = _expected(batch)
        assert (inp.input_ids, inp.positions, inp.slots, inp.seq_lens, inp.logits_rows) == \
            (ids, pos, slots, lens, rows)
        for i, table in enumerate(tables):
            assert inp.block_tables[i, :len(table)].tolist() == table, (i, table)
        rewritten_rows += sum(1 for i, s in enumerate(batch.seqs)
                              if i >= len(before) or before[i][0] is not s)
        for s, n in zip(batch.seqs, batch.num_new_tokens):     # what the engine does next
            s.num_computed_tokens += n
            pool.cache_full_blocks(s)
            if s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(rng.randrange(50))
                if s.num_output_tokens >= s.max_tokens:
                    sched.finish(s, "length")
                    live.remove(s)
    assert steps_with_preemption > 0 and rewritten_rows > 0   # the hard cases did happen
