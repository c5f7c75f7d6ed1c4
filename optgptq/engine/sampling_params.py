"""Per-request sampling parameters, validated on construction with errors naming the field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from optgptq.engine.structured import StructuredSpec

GREEDY_BELOW = 1e-5
"""Temperatures below this sample greedily (vLLM's threshold too)."""
MAX_TOP_LOGPROBS = 20
"""Most alternatives a token's logprobs may list (OpenAI's chat limit)."""
REPETITION_RANGE = (0.01, 100.0)
"""repetition_penalty's bounds: a denormal one made every logit it divides infinite."""
MAX_LOGIT_BIAS = 300
"""Most entries a logit_bias may have (OpenAI's limit)."""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to pick tokens, how many choices, and when to stop.

    ``temperature`` below :data:`GREEDY_BELOW` (0 included) is greedy: dividing logits by a
    smaller one overflows them (a denormal temperature made every row of a batch NaN).
    ``top_k <= 0`` and ``top_p == 1`` disable those filters; the most likely token always stays.
    ``max_tokens=None`` means up to the model's context. Stop strings are not included in the
    output text; stop token ids are (as the model produced them), EOS is not.

    Before temperature and the filters, a row's logits are adjusted (vLLM's order, see
    :mod:`optgptq.engine.logits_processors`): ``logit_bias`` added, EOS and ``stop_token_ids``
    banned while fewer than ``min_tokens`` tokens were generated, then ``repetition_penalty``,
    ``frequency_penalty`` and ``presence_penalty``. A greedy row takes the argmax of the adjusted
    logits. Logprobs stay those of the model's raw distribution (vLLM's default
    ``logprobs_mode``, raw_logprobs).
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    """Seeds the request's own generator; choice ``j`` of ``n`` uses ``seed + j`` (mod 2**64),
    so choice 0 draws what the same request with ``n=1`` draws."""
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    """EOS and ``stop_token_ids`` cannot be sampled, and stop strings do not end the output,
    until this many tokens were generated (vLLM's extra)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the output already contains (OpenAI, -2..2)."""
    frequency_penalty: float = 0.0
    """Subtracted once per occurrence in the output so far (OpenAI, -2..2)."""
    repetition_penalty: float = 1.0
    """In :data:`REPETITION_RANGE`, 1 is off: logits of tokens in the prompt or the output are
    divided by it where positive, multiplied where negative (vLLM's extra, as in the CTRL
    paper)."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """token id -> added to its logit, in [-100, 100] (at most :data:`MAX_LOGIT_BIAS`)."""
    logprobs: bool = False
    """Return the log-probability (under the model, before any adjustment, temperature and
    filters) of each chosen token."""
    top_logprobs: int = 0
    """With ``logprobs``: also the ``top_logprobs`` most likely tokens of each step and their
    logprobs (at most :data:`MAX_TOP_LOGPROBS`)."""
    n: int = 1
    """Choices to generate from the prompt, forked from one prefill."""
    structured: StructuredSpec | None = None
    """Structured output: every choice's output must match this grammar (a JSON schema, a regex,
    ...); its tokens are masked to what the grammar allows, and it ends (``stop``) when the
    grammar is complete (:mod:`optgptq.engine.structured`)."""
    cache_salt: str | None = None
    """The request's prefix-cache namespace (not a sampling choice, but it travels with the
    request's parameters to the engine and the router): blocks are shared only between requests
    of equal salt (:func:`optgptq.engine.block_pool.root_hash`)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens is not None and (not _integer(self.max_tokens)
                                            or self.max_tokens <= 0):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not _number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _integer(self.top_k):
            raise ValueError(f"top_k must be an integer (<= 0 disables it), got {self.top_k!r}")
        if self.seed is not None and not _integer(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str)
                                            or not self.cache_salt):
            raise ValueError(f"cache_salt must be a non-empty string, got {self.cache_salt!r}")
        if not all(_integer(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, "
                             f"got {self.stop_token_ids!r}")
        self._check_adjustments()
        if not _integer(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], "
                             f"got {self.top_logprobs!r}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")
        if self.structured is not None and not isinstance(self.structured, StructuredSpec):
            raise ValueError(f"structured must be a StructuredSpec, got {self.structured!r}")
        if not _integer(self.n) or self.n < 1:
            raise ValueError(f"n must be a positive integer, got {self.n!r}")

    def _check_adjustments(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        low, high = REPETITION_RANGE
        if not _number(self.repetition_penalty) or not low <= self.repetition_penalty <= high:
            raise ValueError(f"repetition_penalty must be in [{low}, {high}], "
                             f"got {self.repetition_penalty!r}")
        if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to biases")
        for token, bias in self.logit_bias.items():
            if not _integer(token) or token < 0 or not _number(bias) or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias must map token ids (integers >= 0) to biases in "
                                 f"[-100, 100], got {token!r}: {bias!r}")
        if not _integer(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} exceeds max_tokens={self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """Whether a penalty needs the sequence's token counts."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)
