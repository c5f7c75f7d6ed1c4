"""A Sequence: one request's tokens, its KV block table and its progress through the engine."""

from __future__ import annotations

from enum import Enum, auto

from optgptq.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Token ids (prompt, then output), the blocks holding their KV, and how many are computed.

    Invariants: ``token_ids`` only grows; ``block_table`` covers at least
    ``num_computed_tokens`` tokens; the first ``num_computed_tokens`` tokens have their KV in
    the cache. A decode step computes the last sampled token, whose KV is not yet cached.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival: int, max_tokens: int, prompt: str | None = None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens          # resolved: params.max_tokens or the context left
        self.arrival = arrival                # admission order: FCFS and preemption victims
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []     # content hashes of full blocks, a cache of the chain
        self.num_hashed_blocks = 0            # leading blocks the pool has already registered
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0            # prompt tokens served from the prefix cache
        self.num_preemptions = 0
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.generator = None                 # per-request sampling generator (seeded requests)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table}, "
                f"{self.status.name})")
