"""Logits processors: a row's logits adjusted before temperature and the filters.

Per request (:class:`~optgptq.engine.sampling_params.SamplingParams`), in vLLM's order:

1. ``logit_bias``: each bias added to its token's logit;
2. ``min_tokens``: while fewer tokens were generated, the sequence's stop ids (EOS unless
   ignored, ``stop_token_ids``) get -inf, so that they cannot be picked;
3. ``repetition_penalty`` r, for every token in the prompt or the output: a logit x becomes
   x / r where x > 0, x * r otherwise;
4. ``frequency_penalty`` f and ``presence_penalty`` p: x - f * count - p * (count > 0), where
   count is the token's number of occurrences in the output so far.

Batched: only the rows that need a processor are touched, and a batch where none does gets its
logits back untouched (no copy, no work). Otherwise the logits are copied once; biases and bans
are one ``index_put`` over their (row, token) pairs, and the penalties are applied only at the
(row, token) pairs a sequence has seen (a few hundred per row, against a vocabulary of tens of
thousands), with per-row parameters gathered per pair.

Token counts (:class:`TokenCounts`) are maintained incrementally on the device: a table with
one row per sequence that uses a penalty holds its output token counts and a mask of the tokens
it has seen (prompt and output). A row is filled when its sequence is first seen (the prompt's
ids scattered once); afterwards only the tokens appended since are added, those of all rows in
one ``index_put``. The alternative, counts rebuilt every step by a ``scatter_add`` over a padded
``[rows, max_len]`` tensor of the sequences' ids, converts every token from Python again, a
cost that grows with the output. Measured per step at batch 64, vocabulary 49152, 512-token
prompts, one new token per row, best of 10 steps (16 CPU cores of an H100 host): padded
counts and prompt mask by ``scatter_add`` 7.9 / 9.5 / 14.4 / 30.0 ms at 16 / 128 / 512 / 2048
output tokens, the table 1.0 / 1.0 / 1.0 / 1.2 ms (2 threads: 7.9-28.5 ms against 5.2-7.1 ms;
on the H100 itself 5.7-27.4 ms against 0.4-0.8 ms); the whole processor call with every row
penalized 2.1-2.9 ms. A table slot goes back to the free list when its sequence is garbage
collected.
"""

from __future__ import annotations

import weakref

import torch

from optgptq.engine.sequence import Sequence


def _needs(seq: Sequence) -> bool:
    p = seq.params
    return bool(p.logit_bias or p.penalized
                or (seq.stop_ids and seq.num_output_tokens < p.min_tokens))


class TokenCounts:
    """Per-sequence token counts of the output and masks of the tokens seen (prompt and
    output), kept up to date across steps on the device."""

    def __init__(self, vocab: int, device: torch.device) -> None:
        self.vocab = vocab
        self.device = device
        self.counts = torch.zeros((0, vocab), dtype=torch.float32, device=device)
        self.seen = torch.zeros((0, vocab), dtype=torch.bool, device=device)
        self._free: list[int] = []
        # sequence -> [its slot, how many of its tokens the slot has taken in]
        self._slots: weakref.WeakKeyDictionary[Sequence, list[int]] = weakref.WeakKeyDictionary()

    def pairs(self, seqs: list[Sequence]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every token ``seqs`` have seen, as ``(row in seqs, token id, count in the output)``
        tensors (a token only in the prompt counts 0)."""
        slots, rows, ids = [], [], []
        for seq in seqs:
            entry = self._slots.get(seq)
            if entry is None:
                entry = self._slots[seq] = [self._assign(seq), seq.num_prompt_tokens]
            slot, taken = entry
            if taken < seq.num_tokens:
                new = seq.token_ids[taken:]
                rows += [slot] * len(new)
                ids += new
                entry[1] = seq.num_tokens
            slots.append(slot)
        if ids:
            at = (self._tensor(rows), self._tensor(ids))
            self.counts.index_put_(at, torch.ones(len(ids), device=self.device), accumulate=True)
            self.seen[at] = True
        index = self._tensor(slots)
        row, token = self.seen[index].nonzero(as_tuple=True)
        return row, token, self.counts[index[row], token]

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def _assign(self, seq: Sequence) -> int:
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self.counts[slot].zero_()
        self.seen[slot].zero_()
        self.seen[slot, self._tensor(seq.token_ids[:seq.num_prompt_tokens])] = True
        weakref.finalize(seq, self._free.append, slot)
        return slot

    def _grow(self) -> None:
        old = self.counts.shape[0]
        size = max(16, 2 * old)
        counts = torch.zeros((size, self.vocab), dtype=torch.float32, device=self.device)
        seen = torch.zeros((size, self.vocab), dtype=torch.bool, device=self.device)
        counts[:old], seen[:old] = self.counts, self.seen
        self.counts, self.seen = counts, seen
        self._free += range(size - 1, old - 1, -1)


class LogitsProcessors:
    """Applies every row's processors; see the module docstring."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._counts: TokenCounts | None = None

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """``logits`` [rows, vocab] adjusted for ``seqs`` (itself where no row needs it)."""
        rows = [i for i, s in enumerate(seqs) if _needs(s)]
        if not rows:
            return logits
        adjusted = logits.clone()
        self._bias_and_bans(adjusted, [(i, seqs[i]) for i in rows])
        penalized = [i for i in rows if seqs[i].params.penalized]
        if penalized:
            self._penalize(adjusted, penalized, [seqs[i] for i in penalized])
        return adjusted

    @staticmethod
    def _bias_and_bans(logits: torch.Tensor, rows: list[tuple[int, Sequence]]) -> None:
        bias = [(row, token, value) for row, s in rows
                for token, value in s.params.logit_bias.items()]
        bans = [(row, token, float("-inf")) for row, s in rows
                if s.num_output_tokens < s.params.min_tokens for token in s.stop_ids]
        dev = logits.device
        for entries, accumulate in ((bias, True), (bans, False)):
            if entries:
                row, token, value = zip(*entries)
                logits.index_put_((torch.tensor(row, device=dev), torch.tensor(token, device=dev)),
                                  torch.tensor(value, dtype=logits.dtype, device=dev),
                                  accumulate=accumulate)

    def _penalize(self, logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> None:
        """The penalties, at the (row, token) pairs the sequences have seen only."""
        if self._counts is None or self._counts.vocab != logits.shape[1]:
            self._counts = TokenCounts(logits.shape[1], self.device)
        pair_row, token, count = self._counts.pairs(seqs)

        def per_pair(name: str) -> torch.Tensor:
            values = torch.tensor([getattr(s.params, name) for s in seqs], dtype=logits.dtype)
            return values.to(logits.device, non_blocking=True)[pair_row]

        at = (torch.tensor(rows, device=logits.device)[pair_row], token)
        x = logits[at]
        if any(s.params.repetition_penalty != 1 for s in seqs):
            r = per_pair("repetition_penalty")
            x = torch.where(x > 0, x / r, x * r)
        x = (x - per_pair("frequency_penalty") * count
             - per_pair("presence_penalty") * (count > 0).to(x.dtype))
        logits[at] = x
