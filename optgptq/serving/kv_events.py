"""vLLM's KV cache events in the router's terms: its block hashes mapped onto this project's.

The prefix-aware router (:mod:`optgptq.serving.router_index`) names a prompt block by the
native engine's chained hash (:func:`optgptq.engine.block_pool.hash_block`) and learns what a
replica holds from ``("add" | "evict", hash)`` events. vLLM's V1 engine, with
``kv_events_config``, publishes per step a batch of

- ``BlockStored``: vLLM's hashes of newly cached full blocks (in chain order), the vLLM hash of
  the block before the first of them (``None`` at the start of a prompt), their token ids and
  the block size;
- ``BlockRemoved``: vLLM hashes of evicted blocks;
- ``AllBlocksCleared``: the prefix cache was reset.

vLLM's hashes cannot be recomputed by the router (they depend on vLLM's hash function, seed
and extra keys), but a stored event carries everything needed to compute the router's own
chain for the same blocks. :class:`VLLMEventTranslator` keeps, per vLLM hash, the router hash
and the number of physical copies vLLM holds (with prefix caching two requests computing the
same prefix at once may both cache it; vLLM stores and removes each copy once):

1. ``BlockStored``: ``parent`` = the router hash of ``parent_block_hash`` (``None`` for the
   first block). For block ``i``: ``h = hash_block(parent, token_ids[i*B:(i+1)*B])``; a vLLM
   hash seen for the first time emits ``("add", h)``; its copy count grows; ``parent = h``.
2. ``BlockRemoved``: a known vLLM hash loses one copy; at zero it is forgotten and
   ``("evict", h)`` is emitted.
3. ``AllBlocksCleared``: every known hash is evicted.

Events this mapping cannot express are skipped and counted (``skipped``): a block size other
than the router's ``B``, an unknown parent (an earlier event was lost), LoRA or extra keys
(multimodal, cache salt: equal tokens, different KV), or a KV cache group other than 0.
The module imports nothing from vLLM: events are matched by their class name and fields.
"""

from __future__ import annotations

from collections.abc import Iterable

from optgptq.engine.block_pool import hash_block


class VLLMEventTranslator:
    """vLLM ``KVCacheEvent`` objects in, router ``("add" | "evict", hash)`` events out."""

    def __init__(self, block_size: int) -> None:
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.block_size = block_size
        self._ours: dict[object, int] = {}     # vLLM hash -> router hash
        self._copies: dict[object, int] = {}   # vLLM hash -> physical blocks vLLM holds
        self.skipped = 0

    def __len__(self) -> int:
        """Distinct blocks vLLM currently holds, as far as the events tell."""
        return len(self._ours)

    def translate(self, events: Iterable[object]) -> list[tuple[str, int]]:
        """Router events for a sequence of vLLM events, in order."""
        out: list[tuple[str, int]] = []
        for event in events:
            kind = type(event).__name__
            if kind == "BlockStored":
                self._stored(event, out)
            elif kind == "BlockRemoved":
                self._removed(event, out)
            elif kind == "AllBlocksCleared":
                out.extend(("evict", h) for h in self._ours.values())
                self._ours.clear()
                self._copies.clear()
            else:
                self.skipped += 1
        return out

    def _stored(self, event, out: list[tuple[str, int]]) -> None:
        b = self.block_size
        tokens = list(event.token_ids)
        if (event.block_size != b or len(tokens) != b * len(event.block_hashes)
                or getattr(event, "lora_name", None) or getattr(event, "lora_id", None)
                or any(getattr(event, "extra_keys", None) or ())
                or getattr(event, "group_idx", None) not in (None, 0)):
            self.skipped += 1
            return
        parent = None
        if event.parent_block_hash is not None:
            parent = self._ours.get(event.parent_block_hash)
            if parent is None:
                self.skipped += 1
                return
        for i, vllm_hash in enumerate(event.block_hashes):
            h = self._ours.get(vllm_hash)
            if h is None:
                h = hash_block(parent, tokens[i * b:(i + 1) * b])
                self._ours[vllm_hash] = h
                out.append(("add", h))
            self._copies[vllm_hash] = self._copies.get(vllm_hash, 0) + 1
            parent = h

    def _removed(self, event, out: list[tuple[str, int]]) -> None:
        if getattr(event, "group_idx", None) not in (None, 0):
            self.skipped += 1
            return
        for vllm_hash in event.block_hashes:
            copies = self._copies.get(vllm_hash, 0) - 1
            if copies > 0:
                self._copies[vllm_hash] = copies
            elif vllm_hash in self._ours:
                del self._copies[vllm_hash]
                out.append(("evict", self._ours.pop(vllm_hash)))
