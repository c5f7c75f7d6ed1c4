"""Scheduler: token budget, chunked prefill, FCFS admission, preemption by recompute, abort."""

from optgptq.engine.block_pool import BlockPool
from optgptq.engine.sampling_params import SamplingParams
from optgptq.engine.scheduler import Scheduler
from optgptq.engine.sequence import Sequence, SequenceStatus

BS = 4


def make(num_blocks=16, max_seqs=8, budget=16, prefix=True):
    pool = BlockPool(num_blocks, BS, enable_prefix_caching=prefix)
    return pool, Scheduler(pool, max_seqs, budget)


def seq(n, rid, arrival, start=0):
    return Sequence(rid, list(range(start, start + n)), SamplingParams(), arrival, max_tokens=32)


def advance(pool, batch, sample_token=7):
    """What the engine does after the model ran: mark computed, sample where complete."""
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        pool.cache_full_blocks(s)
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(sample_token)


def test_chunked_prefill_mixed_with_decode():
    pool, sched = make(budget=8)
    a = seq(3, "a", 0)
    sched.add(a)
    b1 = sched.schedule()
    assert [(s.request_id, n) for s, n in zip(b1.seqs, b1.num_new_tokens)] == [("a", 3)]
    advance(pool, b1)
    b = seq(20, "b", 1, start=100)
    sched.add(b)
    out = []
    for _ in range(4):
        batch = sched.schedule()
        out.append([(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens)])
        advance(pool, batch)
    # a decodes one token a step; b's 20-token prompt runs in chunks of the budget left
    assert out == [[("a", 1), ("b", 7)], [("a", 1), ("b", 7)], [("a", 1), ("b", 6)],
                   [("a", 1), ("b", 1)]]
    assert b.num_output_tokens == 2


def test_fcfs_head_is_not_skipped():
    pool, sched = make(num_blocks=6, budget=64)
    big = seq(20, "big", 0)          # needs 5 blocks + 1 for its first decode
    small = seq(2, "small", 1, start=50)
    sched.add(big)
    advance(pool, sched.schedule())
    late_big = seq(12, "late", 2, start=200)  # cannot fit now
    sched.add(late_big)
    sched.add(small)
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["big"]  # small must wait behind late
    assert [s.request_id for s in sched.waiting] == ["late", "small"]


def test_preemption_frees_newest_and_requeues_in_order():
    pool, sched = make(num_blocks=4, budget=64, prefix=False)
    a, b = seq(4, "a", 0), seq(4, "b", 1, start=10)
    sched.add(a)
    sched.add(b)
    advance(pool, sched.schedule())   # both prefilled: blocks 0 and 1, each full
    assert (a.block_table, b.block_table) == ([0], [1])
    advance(pool, sched.schedule())   # decodes: blocks 2 and 3
    for _ in range(3):
        advance(pool, sched.schedule())
    # a now needs a third block; none free: b (newest) is preempted and requeued
    batch = sched.schedule()
    assert [s.request_id for s in batch.preempted] == ["b"]
    assert [s.request_id for s in batch.seqs] == ["a"]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b]
    assert b.num_preemptions == 1 and sched.num_preemptions == 1


def test_abort_frees_blocks_at_once():
    pool, sched = make()
    a = seq(9, "a", 0)
    sched.add(a)
    advance(pool, sched.schedule())
    assert pool.stats().used_blocks == 3
    aborted = sched.abort("a")
    assert aborted == [a] and a.finish_reason == "abort"
    assert pool.stats().used_blocks == 0 and not sched.has_work()
    assert sched.abort("a") == []


def _with_forks(n, rid, arrival, choices):
    parent = seq(n, rid, arrival)
    parent.forks = [Sequence(rid, list(parent.token_ids), parent.params, arrival, 32, index=j)
                    for j in range(1, choices)]
    return parent


def test_forks_are_seated_at_admission_and_abort_takes_every_choice():
    """A request of 3 choices takes 3 of the cap's seats when admitted; its forks then join the
    batch (running with blocks, waiting without) and an abort frees them all."""
    pool, sched = make(max_seqs=4, budget=64)
    a = _with_forks(5, "a", 0, 3)
    b, c = seq(3, "b", 1, start=50), seq(3, "c", 2, start=60)
    for s in (a, b, c):
        sched.add(s)
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["a", "b"]  # c would need a 5th seat
    advance(pool, batch)
    forks, a.forks = a.forks, []
    assert pool.fork(a, forks[0]) == [(a.block_table[1], forks[0].block_table[1])]
    sched.add_forked(forks[0])
    sched.add_forked(forks[1])  # no blocks: waits, in its arrival place
    assert forks[0] in sched.running and list(sched.waiting) == [forks[1], c]
    batch = sched.schedule()  # the waiting choice takes the last seat, before c
    assert batch.seqs == [a, forks[0], b, forks[1]] and list(sched.waiting) == [c]
    assert forks[1].num_cached_tokens == BS  # it recomputes the prompt past a's full block
    assert sorted(s.index for s in sched.abort("a")) == [0, 1, 2]
    assert all(s.finish_reason == "abort" for s in [a, *forks])
    sched.abort("b")
    assert pool.stats().used_blocks == 0 and list(sched.waiting) == [c]


def test_max_num_seqs_caps_the_batch():
    pool, sched = make(max_seqs=2, budget=64)
    for i in range(3):
        sched.add(seq(2, f"s{i}", i, start=10 * i))
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["s0", "s1"]
