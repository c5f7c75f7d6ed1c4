"""What an engine core reports: a request's output after a step, and the engine's load.

Plain dataclasses with no torch behind them, so that processes which only relay an engine's
outputs (the serving replicas, whose engine core runs in a child process) never import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from optgptq.engine.block_pool import PoolStats


@dataclass
class RequestOutput:
    """One choice of a request after a step: the new part (delta) and everything so far.

    ``logprobs``: the chosen tokens' (with ``SamplingParams.logprobs``); ``top_logprobs``: per
    token, the most likely ``(token id, logprob)`` (with ``SamplingParams.top_logprobs``);
    ``index``: which of the request's ``n`` choices this is."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    delta_text: str
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[float] | None = None
    num_cached_tokens: int = 0
    top_logprobs: list[list[tuple[int, float]]] | None = None
    index: int = 0


@dataclass
class EngineStats:
    waiting: int
    running: int
    preemptions: int
    pool: PoolStats
