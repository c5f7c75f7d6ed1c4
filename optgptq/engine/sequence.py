"""A Sequence: one request's tokens, its KV block table and its progress through the engine."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

from optgptq.engine.sampling_params import SamplingParams


class InvalidRequest(ValueError):
    """A request the engine refuses; ``param`` names the request field at fault, if one is;
    ``code``: ``context_length_exceeded`` where the context is what it overruns, else
    ``invalid_value`` (OpenAI's error codes)."""

    def __init__(self, message: str, param: str | None = None,
                 code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class RequestLimits:
    """What an engine core checks requests against (:func:`check_request`); it travels in the
    core's ``model_info``, so a caller can run the same check before the core's next turn."""

    vocab_size: int
    max_model_len: int
    block_size: int
    num_blocks: int
    max_choices: int     # n: the scheduler's max_num_seqs (the synthetic core makes one)
    has_tokenizer: bool  # False with skip_tokenizer_init: no stop strings, no grammars


def check_request(ids: list[int], params: SamplingParams, limits: RequestLimits,
                  check_ids: bool = True) -> int:
    """The request's ``max_tokens`` (``params.max_tokens``, else the context left);
    :class:`InvalidRequest` naming what is wrong: more choices than the engine runs, stop strings
    or a grammar without a tokenizer, an empty prompt, ids outside the vocabulary
    (``check_ids``; the ``logit_bias`` and stop ids always), a prompt or a prompt + max_tokens
    (or min_tokens) beyond the context, more KV blocks than the pool has (for one choice: each
    of ``n`` is a sequence of its own once forked)."""
    vocab_size, max_model_len = limits.vocab_size, limits.max_model_len
    if params.n > limits.max_choices:
        raise InvalidRequest(f"n={params.n} exceeds the {limits.max_choices} choices this "
                             f"engine runs per request (max_num_seqs)", "n")
    if not limits.has_tokenizer and params.stop:
        raise InvalidRequest("stop strings are not available: this engine runs without a "
                             "tokenizer (skip_tokenizer_init)", "stop")
    if not limits.has_tokenizer and params.structured is not None:
        raise InvalidRequest(f"{params.structured.field}: structured output needs the "
                             f"tokenizer, and this engine runs without one (skip_tokenizer_init)",
                             params.structured.field)
    if check_ids and not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
        raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab_size})", "prompt")
    if any(t >= vocab_size for t in params.logit_bias):
        raise InvalidRequest(f"logit_bias token ids must be in [0, {vocab_size})", "logit_bias")
    if any(t >= vocab_size for t in params.stop_token_ids):
        raise InvalidRequest(f"stop_token_ids must be in [0, {vocab_size})", "stop_token_ids")
    if not ids:
        raise InvalidRequest("prompt is empty", "prompt")
    if len(ids) >= max_model_len:
        raise InvalidRequest(f"prompt has {len(ids)} tokens; the model's context "
                             f"(max_model_len) is {max_model_len}, leaving no room to generate",
                             "prompt", "context_length_exceeded")
    room = max_model_len - len(ids)
    if params.max_tokens is not None and params.max_tokens > room:
        raise InvalidRequest(f"max_tokens={params.max_tokens} plus the prompt's {len(ids)} "
                             f"tokens exceeds max_model_len={max_model_len}", "max_tokens",
                             "context_length_exceeded")
    max_tokens = params.max_tokens or room
    if params.min_tokens > max_tokens:
        raise InvalidRequest(f"min_tokens={params.min_tokens} exceeds the {max_tokens} tokens "
                             f"the context leaves (max_model_len={max_model_len})", "min_tokens")
    need = -(-(len(ids) + max_tokens) // limits.block_size)
    if need > limits.num_blocks:
        raise InvalidRequest(f"request needs {need} KV blocks for {len(ids)} prompt + "
                             f"{max_tokens} output tokens but the pool has {limits.num_blocks}; "
                             f"lower max_tokens or enlarge the KV cache", "max_tokens")
    return max_tokens


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Token ids (prompt, then output), the blocks holding their KV, and how many are computed.

    Invariants: ``token_ids`` only grows; ``block_table`` covers at least
    ``num_computed_tokens`` tokens; the first ``num_computed_tokens`` tokens have their KV in
    the cache. A decode step computes the last sampled token, whose KV is not yet cached.

    A request of ``n`` choices is ``n`` sequences of one ``request_id`` (``index`` 0 .. n-1).
    Only choice 0 is scheduled at first; the others wait in its ``forks`` until its prompt is
    computed, then sample their first token from its logits and share its prompt blocks.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival: int, max_tokens: int, prompt: str | None = None,
                 index: int = 0) -> None:
        self.request_id = request_id
        self.index = index                    # which of the request's n choices
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
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.finish_reason: str | None = None
        self.generator = None                 # per-request sampling generator (seeded requests)
        # ids that end the output (stop_token_ids; the engine adds EOS unless ignored), banned
        # while fewer than min_tokens tokens were generated
        self.stop_ids: frozenset[int] = frozenset(params.stop_token_ids)
        self.forks: list[Sequence] = []       # choices 1 .. n-1 until the prompt is computed
        self.matcher = None                   # structured output: its grammar's state

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
