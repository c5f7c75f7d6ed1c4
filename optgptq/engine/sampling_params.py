"""Per-request sampling parameters, validated on construction with errors naming the field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GREEDY_BELOW = 1e-5
"""Temperatures below this sample greedily (vLLM's threshold too)."""


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature`` below :data:`GREEDY_BELOW` (0 included) is greedy: dividing logits by a
    smaller one overflows them (a denormal temperature made every row of a batch NaN).
    ``top_k <= 0`` and ``top_p == 1`` disable those filters; the most likely token always stays.
    ``max_tokens=None`` means up to the model's context. Stop strings are not included in the
    output text; stop token ids are (as the model produced them), EOS is not.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    """Return the log-probability (under the model, before temperature and filters) of each
    chosen token."""
    cache_salt: str | None = None
    """The request's prefix-cache namespace (not a sampling choice, but it travels with the
    request's parameters to the engine and the router): blocks are shared only between requests
    of equal salt (:func:`optgptq.engine.block_pool.root_hash`)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int)
                                            or isinstance(self.max_tokens, bool)
                                            or self.max_tokens <= 0):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            raise ValueError(f"top_k must be an integer (<= 0 disables it), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str)
                                            or not self.cache_salt):
            raise ValueError(f"cache_salt must be a non-empty string, got {self.cache_salt!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, "
                             f"got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
