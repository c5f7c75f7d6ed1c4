"""Token sampling for one step: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Rows are processed together where their parameters allow: greedy rows by one argmax, sampled
rows by one filtered softmax. A row with its own seed draws from its own generator, so its
output does not depend on what else is in the batch; other rows share the engine's generator.
Logprobs are those of the model's distribution (log-softmax of the raw logits) for the chosen
token, as the OpenAI API reports them.
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

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float] | None]:
        """logits [num_seqs, vocab] float32 -> (token ids, chosen-token logprobs or None)."""
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if not sampled:                                   # the common all-greedy batch
            tokens = logits.argmax(dim=-1)
        else:
            tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        if greedy and sampled:
            idx = torch.tensor(greedy, device=logits.device)
            tokens[idx] = logits[idx].argmax(dim=-1)
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            probs = self._probs(logits[idx], [seqs[i] for i in sampled])
            for row, i in enumerate(sampled):
                gen = seqs[i].generator
                if gen is None:
                    continue
                tokens[i] = torch.multinomial(probs[row], 1, generator=gen)[0]
            shared = [row for row, i in enumerate(sampled) if seqs[i].generator is None]
            if shared:
                picks = torch.multinomial(probs[shared], 1, generator=self.generator)[:, 0]
                tokens[torch.tensor([sampled[r] for r in shared], device=logits.device)] = picks
        logprobs = None
        if any(s.params.logprobs for s in seqs):
            lp = torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1))[:, 0]
            logprobs = lp.tolist()
        return tokens.tolist(), logprobs

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
            # keep the smallest prefix whose mass reaches p (always at least the top token)
            drop = (probs.cumsum(dim=-1) - probs) >= p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
        return torch.softmax(logits, dim=-1)
