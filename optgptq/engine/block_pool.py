"""The KV block pool: reference-counted blocks, a free list, and prefix reuse with LRU eviction.

Pure Python (no torch): it hands out block ids; the model runner owns the tensors they index.

Algorithm
---------
- ``num_blocks`` blocks of ``block_size`` token slots. A block is *free* (no owner, no content
  worth keeping), *in use* (``ref_count > 0``) or *cached* (``ref_count == 0`` but holding the
  KV of a full block that a later prompt may reuse).
- Every full block of a sequence is named by a chained hash ``hash(parent_hash, token_ids)``
  (:func:`hash_block`, 64 bits of BLAKE2b), so equal hashes mean equal whole prefixes. The first
  block's parent is the sequence's root: None, or the hash of its cache salt
  (:func:`root_hash`), so that prefixes are shared only within one salt's namespace.
  When a block fills with computed tokens it is registered under its hash (first writer wins;
  a duplicate of an already registered block stays anonymous and is freed normally).
- Admission looks up a prompt's full blocks in order (never the block holding its last token,
  which must be computed to get logits); every hit is checked against the stored parent hash
  and token ids, so a hash collision can never reuse the wrong KV. Hit blocks gain a reference.
- Freeing drops references in reverse block order; a block reaching zero goes to the free list
  if anonymous, or to the tail of an LRU list if registered. Allocation takes from the free list
  first and only then evicts the least recently used cached block (the tail blocks of the last
  finished sequence go first), unregistering its hash.
- Forking (a request's ``n`` choices after its one prefill): a choice takes a reference to each
  full block of the sequence it forks from, and a fresh block for a partially filled last one,
  whose KV the model runner copies (its later tokens go to slots the other choices also
  write). The pool only hands out the ids; see :meth:`BlockPool.fork`.
- With ``record_events`` the pool logs ``("add", hash)`` and ``("evict", hash)`` in order, for a
  router that mirrors which prefixes each replica holds; :meth:`drain_events` takes them.

Parameters: ``num_blocks``, ``block_size``, ``enable_prefix_caching`` (off: blocks are never
registered or looked up), ``record_events``, ``hash_fn`` (injectable for collision tests).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass

from optgptq.engine.sequence import Sequence


def hash_block(parent_hash: int | None, token_ids: Seq[int]) -> int:
    """Chained content hash of one full block: 64 bits of BLAKE2b over parent hash and tokens."""
    h = hashlib.blake2b(digest_size=8)
    h.update(b"root" if parent_hash is None else parent_hash.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return int.from_bytes(h.digest(), "little")


def root_hash(cache_salt: str | None) -> int | None:
    """The parent of a sequence's first block: None (the shared root), or a hash of its cache
    salt, so that salted prefixes never match other namespaces' blocks."""
    if cache_salt is None:
        return None
    return int.from_bytes(hashlib.blake2b(b"salt\x00" + cache_salt.encode(), digest_size=8)
                          .digest(), "little")


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    parent_hash: int | None = None
    token_ids: tuple[int, ...] = ()


@dataclass
class PoolStats:
    num_blocks: int
    free_blocks: int          # allocatable now: anonymous free plus evictable cached
    cached_blocks: int        # registered blocks with no owner (reusable, evictable)
    used_blocks: int
    prefix_hit_tokens: int
    prefix_miss_tokens: int
    evictions: int


class BlockPool:
    """Block ids for sequences, with prefix reuse. See the module docstring for the algorithm."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 record_events: bool = False,
                 hash_fn: Callable[[int | None, Seq[int]], int] = hash_block) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.record_events = record_events
        self.hash_fn = hash_fn
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._by_hash: dict[int, int] = {}
        self._events: list[tuple[str, int]] = []
        self.prefix_hit_tokens = 0
        self.prefix_miss_tokens = 0
        self.evictions = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_available(self) -> int:
        return len(self._free) + len(self._evictable)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so ``seq`` can hold ``num_computed_tokens + num_new_tokens`` tokens."""
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    # -- prefix lookup and admission -----------------------------------------------------
    def _hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        bs = self.block_size
        while len(seq.block_hashes) < num_blocks:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else root_hash(seq.params.cache_salt)
            seq.block_hashes.append(self.hash_fn(parent, seq.token_ids[i * bs:(i + 1) * bs]))
        return seq.block_hashes[:num_blocks]

    def find_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks holding ``seq``'s leading full blocks (no side effects)."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hits: list[int] = []
        parent = root_hash(seq.params.cache_salt)
        for i, h in enumerate(self._hashes(seq, (seq.num_tokens - 1) // bs)):
            block_id = self._by_hash.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.parent_hash != parent or block.token_ids != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break  # hash collision: never reuse KV of other tokens
            hits.append(block_id)
            parent = h
        return hits

    def can_admit(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        """Whether ``seq`` can take ``hits`` and then blocks for ``num_new_tokens`` more tokens."""
        reviving = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        total = -(-(len(hits) * self.block_size + num_new_tokens) // self.block_size)
        return self.num_available - reviving >= total - len(hits)

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give a waiting ``seq`` its prefix hits; they count as computed tokens."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._evictable[block_id]
            block.ref_count += 1
        seq.block_table = list(hits)
        seq.num_hashed_blocks = len(hits)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        self.prefix_hit_tokens += seq.num_cached_tokens
        self.prefix_miss_tokens += seq.num_tokens - seq.num_cached_tokens

    # -- allocation, registration, freeing -----------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Append blocks for ``num_new_tokens`` more tokens; False (and no change) if short."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need == 0:  # (most decode steps)
            return True
        if need > self.num_available:
            return False
        for _ in range(need):
            seq.block_table.append(self._take())
        return True

    def _take(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            block = self.blocks[block_id]
            del self._by_hash[block.hash]
            self._log("evict", block.hash)
            self.evictions += 1
            block.hash, block.parent_hash, block.token_ids = None, None, ()
        self.blocks[block_id].ref_count = 1
        return block_id

    def fork(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]] | None:
        """Give ``child`` (no blocks yet, the same prompt) ``parent``'s computed tokens: its
        full blocks by reference and a copy of a partially filled last block. Returns the
        ``(source, destination)`` block pairs whose KV must be copied, or None (and no change)
        when the pool has no block for the copy."""
        assert not child.block_table
        bs = self.block_size
        computed = parent.num_computed_tokens
        full = computed // bs
        partial = computed % bs != 0
        if partial and not self.num_available:
            return None
        for block_id in parent.block_table[:full]:
            self.blocks[block_id].ref_count += 1
        child.block_table = parent.block_table[:full]
        pairs = []
        if partial:
            child.block_table.append(self._take())
            pairs.append((parent.block_table[full], child.block_table[-1]))
        child.block_hashes = parent.block_hashes[:full]
        child.num_hashed_blocks = min(parent.num_hashed_blocks, full)
        child.num_computed_tokens = computed
        child.num_cached_tokens = parent.num_cached_tokens
        return pairs

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register ``seq``'s blocks that are now full of computed tokens under their hashes."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        if full <= seq.num_hashed_blocks:
            return
        hashes = self._hashes(seq, full)
        for i in range(seq.num_hashed_blocks, full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None or hashes[i] in self._by_hash:
                continue
            block.hash = hashes[i]
            block.parent_hash = hashes[i - 1] if i else root_hash(seq.params.cache_salt)
            block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            self._by_hash[block.hash] = block.block_id
            self._log("add", block.hash)
        seq.num_hashed_blocks = full

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references, tail first; registered blocks stay cached (LRU)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_hashed_blocks = 0

    # -- reporting ----------------------------------------------------------------------
    def _log(self, kind: str, block_hash: int) -> None:
        if self.record_events:
            self._events.append((kind, block_hash))

    def drain_events(self) -> list[tuple[str, int]]:
        """Take the ordered ``("add" | "evict", hash)`` events logged since the last call."""
        events, self._events = self._events, []
        return events

    def stats(self) -> PoolStats:
        return PoolStats(
            num_blocks=self.num_blocks,
            free_blocks=self.num_available,
            cached_blocks=len(self._evictable),
            used_blocks=self.num_blocks - self.num_available,
            prefix_hit_tokens=self.prefix_hit_tokens,
            prefix_miss_tokens=self.prefix_miss_tokens,
            evictions=self.evictions,
        )
