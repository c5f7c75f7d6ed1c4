"""Token sampling for one step: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Rows are processed together where their parameters allow: greedy rows by one argmax, sampled
rows by one filtered softmax. A row with its own seed draws from its own generator, so its
output does not depend on what else is in the batch; other rows share the engine's generator.
Logprobs are those of the model's distribution (log-softmax of the raw logits) for the chosen
token, as the OpenAI API reports them.

Isolation: a sampled row whose distribution cannot be sampled (NaN, or no mass after the
filters) gets token -1 and draws nothing, so only its own request fails; the other rows are
sampled exactly as they would be without it (no generator advances for the failed row).
"""

from __future__ import annotations

import torch

from optgptq.engine.sequence import Sequence


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def generator_for(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]
                 ) -> tuple[list[int], list[float | None] | None]:
        """logits [num_seqs, vocab] float32 -> (token ids, logprobs).

        A token is -1 where that (sampled) row could not be sampled. ``logprobs`` is None unless
        some row asks for them; then it has one entry per row: the chosen token's logprob for a
        row that asked and got a token, None for the others.
        """
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
        token_list = tokens.tolist()
        for i in failed:
            token_list[i] = -1
        logprobs = None
        if any(s.params.logprobs for s in seqs):
            lp = torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1))[:, 0].tolist()
            logprobs = [v if s.params.logprobs and t >= 0 else None
                        for v, s, t in zip(lp, seqs, token_list)]
        return token_list, logprobs

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
