"""BlockPool: exact block ids, prefix reuse, collision safety, LRU eviction, events (pure Python)."""

import pytest

from optgptq.engine.block_pool import BlockPool, hash_block
from optgptq.engine.sampling_params import SamplingParams
from optgptq.engine.sequence import Sequence

BS = 4


def seq(tokens, rid="r", arrival=0):
    return Sequence(rid, list(tokens), SamplingParams(), arrival, max_tokens=8)


def run_prefill(pool, s):
    """Admit s with its prefix hits and compute the whole prompt."""
    hits = pool.find_prefix(s)
    n = s.num_tokens - len(hits) * BS
    assert pool.can_admit(s, hits, n)
    pool.admit(s, hits)
    assert pool.allocate(s, n)
    s.num_computed_tokens += n
    pool.cache_full_blocks(s)
    return hits


def test_allocation_ids_and_free_order():
    pool = BlockPool(8, BS)
    a = seq(range(10))
    run_prefill(pool, a)
    assert a.block_table == [0, 1, 2]
    b = seq(range(100, 105), "b")
    run_prefill(pool, b)
    assert b.block_table == [3, 4]
    assert pool.stats().free_blocks == 3
    pool.free(a)
    # a's two full blocks stay cached, its partial block returns to the free list
    st = pool.stats()
    assert (st.free_blocks, st.cached_blocks, st.used_blocks) == (6, 2, 2)


def test_prefix_hit_reuses_blocks_and_counts_tokens():
    pool = BlockPool(8, BS)
    a = seq(range(10))
    run_prefill(pool, a)
    b = seq(list(range(8)) + [50, 51, 52], "b")
    hits = run_prefill(pool, b)
    assert hits == [0, 1]
    assert b.block_table[:2] == [0, 1] and b.num_cached_tokens == 8
    assert pool.blocks[0].ref_count == 2
    st = pool.stats()
    assert st.prefix_hit_tokens == 8 and st.prefix_miss_tokens == 10 + 3


def test_last_token_block_is_never_a_hit():
    pool = BlockPool(8, BS)
    a = seq(range(8))
    run_prefill(pool, a)
    b = seq(range(8), "b")  # identical prompt: its last block must still be computed
    assert pool.find_prefix(b) == [0]


def test_lru_eviction_takes_oldest_and_tail_first():
    pool = BlockPool(4, BS, record_events=True)
    a = seq(range(8), "a")
    run_prefill(pool, a)           # blocks 0,1 (full, registered)
    pool.free(a)                   # evictable order: 1, 0 (tail first)
    c = seq(range(100, 108), "c")
    run_prefill(pool, c)           # takes the free blocks 2, 3
    assert c.block_table == [2, 3]
    d = seq(range(200, 204), "d")
    run_prefill(pool, d)           # nothing free: evicts block 1 (a's tail)
    assert d.block_table == [1]
    h0 = hash_block(None, list(range(4)))
    h1 = hash_block(h0, list(range(4, 8)))
    events = pool.drain_events()
    assert ("evict", h1) in events and ("evict", h0) not in events
    assert events[:2] == [("add", h0), ("add", h1)]
    assert pool.stats().evictions == 1
    assert pool.find_prefix(seq(range(9), "e")) == [0]  # a's head block still reusable


def test_hash_collision_never_reuses_wrong_block():
    pool = BlockPool(8, BS, hash_fn=lambda parent, toks: 42)  # every block collides
    a = seq(range(8))
    run_prefill(pool, a)
    b = seq(range(100, 109), "b")
    assert pool.find_prefix(b) == []
    run_prefill(pool, b)
    assert set(b.block_table).isdisjoint(a.block_table)


def test_parent_mismatch_is_a_miss():
    # Same second-block tokens under a different first block: the chained hash differs.
    pool = BlockPool(8, BS)
    run_prefill(pool, seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert pool.find_prefix(seq([9, 9, 9, 9, 5, 6, 7, 8, 9], "b")) == []


def test_allocate_fails_without_side_effects():
    pool = BlockPool(2, BS)
    a = seq(range(8))
    run_prefill(pool, a)
    before = list(a.block_table)
    assert not pool.allocate(a, 1)
    assert a.block_table == before


def test_prefix_caching_off():
    pool = BlockPool(8, BS, enable_prefix_caching=False)
    run_prefill(pool, seq(range(10)))
    assert pool.find_prefix(seq(range(10), "b")) == []


def test_double_free_is_caught():
    pool = BlockPool(4, BS)
    a = seq(range(4))
    run_prefill(pool, a)
    table = list(a.block_table)
    pool.free(a)
    a.block_table = table
    with pytest.raises(AssertionError):
        pool.free(a)


@pytest.mark.parametrize("prompt_len", [8, 10])
def test_fork_shares_full_blocks_and_copies_the_partial_one(prompt_len):
    """A forked choice references its parent's full prompt blocks and gets its own block for a
    partially filled one (whose KV the runner copies); freeing both returns everything."""
    pool = BlockPool(8, BS)
    parent = seq(range(prompt_len))
    run_prefill(pool, parent)
    child = Sequence("r", list(range(prompt_len)), SamplingParams(), 0, 8, index=1)
    pairs = pool.fork(parent, child)
    full = prompt_len // BS
    assert child.block_table[:full] == parent.block_table[:full]
    assert all(pool.blocks[b].ref_count == 2 for b in parent.block_table[:full])
    if prompt_len % BS:
        assert pairs == [(parent.block_table[-1], child.block_table[-1])]
        assert child.block_table[-1] not in parent.block_table
    else:
        assert pairs == [] and len(child.block_table) == full
    assert child.num_computed_tokens == prompt_len and child.num_hashed_blocks == full
    assert pool.stats().used_blocks == len(parent.block_table) + (prompt_len % BS > 0)
    pool.free(parent)
    pool.free(child)
    assert pool.stats().used_blocks == 0


def test_fork_without_a_block_for_the_copy_changes_nothing():
    pool = BlockPool(3, BS)
    parent = seq(range(10))
    run_prefill(pool, parent)   # 3 blocks: the pool is full
    child = Sequence("r", list(range(10)), SamplingParams(), 0, 8, index=1)
    assert pool.fork(parent, child) is None
    assert child.block_table == []
    assert [pool.blocks[b].ref_count for b in parent.block_table] == [1] * 3
