"""Token sampling for one step: adjusted logits, greedy, temperature, top-k, top-p, per-request
seeds, logprobs and the top alternatives, and the first tokens of forked choices.

Each row's logits are first adjusted by its request's processors (logit bias, min_tokens,
repetition / frequency / presence penalties: :mod:`optgptq.engine.logits_processors`; a batch
that uses none pays nothing), then a row whose sequence has a grammar (structured output) gets
-inf for every token its grammar does not allow now (:mod:`optgptq.engine.structured`; other
rows untouched). Rows are then processed together where their parameters allow:
greedy rows by one argmax of the adjusted logits, sampled rows by one filtered softmax. A row
with its own seed draws from its own generator, so its output does not depend on what else is
in the batch; other rows share the engine's generator. Logprobs are those of the model's raw
distribution (log-softmax of the logits before any adjustment, temperature or filter; vLLM's
default ``raw_logprobs``): the chosen token's, and with ``top_logprobs`` the most likely tokens'.

Forks (:meth:`Sampler.sample`): a sequence whose prompt completes with choices waiting in its
``forks`` lends its logits row to each of them, so every choice's first token is drawn from the
one prefill's distribution, each with its own draw.

Isolation: a sampled row whose distribution cannot be sampled (NaN, or no mass after the
filters) gets token -1 and draws nothing, so only its own request fails; the other rows are
sampled exactly as they would be without it (no generator advances for the failed row).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from optgptq.engine.logits_processors import LogitsProcessors
from optgptq.engine.sequence import Sequence
from optgptq.engine.structured import apply_masks

TopLogprobs = list[tuple[int, float]]
"""The most likely ``(token id, logprob)`` of a step, most likely first."""


class Picks(NamedTuple):
    """One entry per row. ``logprobs`` is None unless some row asks for them, then a float for a
    row that asked and got a token (None for the others); likewise ``top_logprobs`` for the rows
    that asked for alternatives."""

    tokens: list[int]
    logprobs: list[float | None] | None
    top_logprobs: list[TopLogprobs | None] | None


class Sample(NamedTuple):
    seq: Sequence
    token: int
    logprob: float | None
    top_logprobs: TopLogprobs | None


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.processors = LogitsProcessors(device)

    def generator_for(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[Sample]:
        """The next token of each of ``seqs`` (one logits row each), and the first token of
        each sequence's waiting forks, drawn from its row; in that order."""
        if any(s.forks for s in seqs):
            rows = [r for r, s in enumerate(seqs) for _ in range(1 + len(s.forks))]
            seqs = [c for s in seqs for c in (s, *s.forks)]
            logits = logits[torch.tensor(rows, device=logits.device)]
        picks = self(logits, seqs)
        none = [None] * len(seqs)
        return [Sample(*entry) for entry in zip(seqs, picks.tokens, picks.logprobs or none,
                                                 picks.top_logprobs or none)]

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> Picks:
        """logits [num_seqs, vocab] float32 -> one pick per row (token -1 where that sampled
        row could not be sampled)."""
        raw, logits = logits, self.processors(logits, seqs)
        guided = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if guided:
            if logits is raw:
                logits = logits.clone()
            apply_masks(logits, guided, [seqs[i].matcher for i in guided])
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        failed: list[int] = []
        if not sampled:                                   # the common all-greedy batch
            tokens = logits.argmax(dim=-1)
        else:  # zeros, not empty: a failed row's entry must stay a valid index for the gather
            tokens = torch.zeros(len(seqs), dtype=torch.long, device=logits.device)
        if greedy and sampled:
            idx = torch.tensor(greedy, device=logits.device)
            tokens[idx] = logits[idx].argmax(dim=-1)
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            probs = self._probs(logits[idx], [seqs[i] for i in sampled])
            # checked before any draw, so no generator moves for a batch with a bad row
            ok = (torch.isfinite(probs).all(dim=1) & (probs.sum(dim=1) > 0)).tolist()
            failed = [i for i, good in zip(sampled, ok) if not good]
            for row, i in enumerate(sampled):
                gen = seqs[i].generator
                if gen is None or not ok[row]:
                    continue
                tokens[i] = torch.multinomial(probs[row], 1, generator=gen)[0]
            shared = [row for row, i in enumerate(sampled) if seqs[i].generator is None and ok[row]]
            if shared:
                picks = torch.multinomial(probs[shared], 1, generator=self.generator)[:, 0]
                tokens[torch.tensor([sampled[r] for r in shared], device=logits.device)] = picks
        if guided:  # a grammar that allows nothing (say, only EOS while min_tokens bans it)
            best = logits[torch.tensor(guided, device=logits.device)].amax(dim=-1).tolist()
            failed += [i for i, v in zip(guided, best) if v == float("-inf") and i not in failed]
        token_list = tokens.tolist()
        for i in failed:
            token_list[i] = -1
        return Picks(token_list, *self._logprobs(raw, seqs, tokens, token_list))

    @staticmethod
    def _logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: torch.Tensor,
                  token_list: list[int]
                  ) -> tuple[list[float | None] | None, list[TopLogprobs | None] | None]:
        """The chosen tokens' raw logprobs and the top alternatives, for the rows that ask."""
        if not any(s.params.logprobs for s in seqs):
            return None, None
        rows = [i for i, (s, t) in enumerate(zip(seqs, token_list)) if s.params.logprobs and t >= 0]
        chosen: list[float | None] = [None] * len(seqs)
        top: list[TopLogprobs | None] | None = (
            [None] * len(seqs) if any(s.params.top_logprobs for s in seqs) else None)
        if not rows:
            return chosen, top
        idx = torch.tensor(rows, device=logits.device)
        lp = torch.log_softmax(logits[idx], dim=-1)
        for i, v in zip(rows, lp.gather(1, tokens[idx].unsqueeze(1))[:, 0].tolist()):
            chosen[i] = v
        k = max(seqs[i].params.top_logprobs for i in rows)
        if k:
            values, ids = (t.tolist() for t in lp.topk(k, dim=-1))
            for j, i in enumerate(rows):
                n = seqs[i].params.top_logprobs
                if n:
                    top[i] = list(zip(ids[j][:n], values[j][:n]))
        return chosen, top

    @staticmethod
    def _probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Temperature, then top-k, then top-p, then softmax; one row per sampled sequence."""
        temps = torch.tensor([s.params.temperature for s in seqs], device=logits.device)
        logits = logits / temps.unsqueeze(1)
        vocab = logits.shape[1]
        top_k = [s.params.top_k if 0 < s.params.top_k < vocab else vocab for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        if min(top_k) < vocab or min(top_p) < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
            k = torch.tensor(top_k, device=logits.device).unsqueeze(1)
            sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
            probs = torch.softmax(sorted_logits, dim=-1)
            p = torch.tensor(top_p, device=logits.device, dtype=probs.dtype).unsqueeze(1)
            # keep the smallest prefix whose mass reaches p, and always the top token (a p that
            # rounds to 0 in float32 would drop it too)
            drop = (probs.cumsum(dim=-1) - probs) >= p
            drop[:, 0] = False
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
        return torch.softmax(logits, dim=-1)
