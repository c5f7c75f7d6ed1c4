"""The batched logits processors and the sampler against per-row PyTorch references: logit
bias, min_tokens, repetition / frequency / presence penalties, greedy and sampled rows, raw
logprobs and their top alternatives, forked choices."""

from __future__ import annotations

import gc
import random

import pytest
import torch

from optgptq.engine.logits_processors import LogitsProcessors
from optgptq.engine.sampler import Sampler
from optgptq.engine.sampling_params import SamplingParams
from optgptq.engine.sequence import Sequence

VOCAB = 97
EOS = 3
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """One row's adjusted logits, computed token by token."""
    p, x = seq.params, logits.clone()
    prompt, output = seq.token_ids[:seq.num_prompt_tokens], seq.output_token_ids
    for token, bias in p.logit_bias.items():
        x[token] += bias
    if len(output) < p.min_tokens:
        for token in seq.stop_ids:
            x[token] = float("-inf")
    for token in set(prompt) | set(output):
        if p.repetition_penalty != 1:
            x[token] = (x[token] / p.repetition_penalty if x[token] > 0
                        else x[token] * p.repetition_penalty)
    for token in set(output):
        x[token] -= p.frequency_penalty * output.count(token) + p.presence_penalty
    return x


def random_params(rng: random.Random, **kwargs) -> SamplingParams:
    """A mix: about half the rows adjust nothing."""
    if rng.random() < 0.5:
        return SamplingParams(**kwargs)
    return SamplingParams(
        presence_penalty=rng.choice([0, rng.uniform(-2, 2)]),
        frequency_penalty=rng.choice([0, rng.uniform(-2, 2)]),
        repetition_penalty=rng.choice([1, rng.uniform(0.5, 2)]),
        logit_bias={rng.randrange(VOCAB): rng.uniform(-100, 100)
                    for _ in range(rng.choice([0, 3]))},
        min_tokens=rng.choice([0, 4]), stop_token_ids=[5], **kwargs)


def random_seq(rng: random.Random, i: int, params: SamplingParams) -> Sequence:
    seq = Sequence(f"s{i}", [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))],
                   params, i, max_tokens=64)
    seq.token_ids += [rng.randrange(8) for _ in range(rng.randrange(0, 10))]  # repeats
    seq.stop_ids |= {EOS}
    return seq


@pytest.mark.parametrize("device", DEVICES)
def test_processors_match_the_reference_across_steps(device):
    """Rows with and without processors, histories growing step by step (the counts are
    maintained incrementally), sequences replaced (their slots reused)."""
    rng = random.Random(0)
    processors = LogitsProcessors(torch.device(device))
    seqs = [random_seq(rng, i, random_params(rng)) for i in range(40)]  # > one table growth
    for step in range(6):
        logits = torch.randn(len(seqs), VOCAB, generator=torch.Generator().manual_seed(step)) * 3
        out = processors(logits.to(device), seqs).cpu()
        for row, seq in enumerate(seqs):
            torch.testing.assert_close(out[row], reference(logits[row], seq))
        for seq in seqs:
            seq.token_ids.append(rng.randrange(8))
        seqs[rng.randrange(len(seqs))] = random_seq(rng, 100 + step, random_params(rng))
        gc.collect()
    plain = [random_seq(rng, i, SamplingParams()) for i in range(3)]
    logits = torch.randn(3, VOCAB)
    assert processors(logits, plain) is logits  # nothing to do: no copy, no work


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sampler_picks_from_the_adjusted_logits_and_reports_raw_logprobs(temperature, device):
    """Greedy rows take the argmax of the adjusted logits; seeded sampled rows draw what a
    softmax of the adjusted logits / temperature gives their generator, whatever their
    neighbours; logprobs and the top alternatives are the raw distribution's."""
    rng = random.Random(1)
    seqs = [random_seq(rng, i, random_params(rng, temperature=temperature, seed=i, logprobs=True,
                                             top_logprobs=rng.choice([0, 3])))
            for i in range(10)]
    sampler = Sampler(torch.device(device), seed=0)
    for seq in seqs:
        seq.generator = sampler.generator_for(seq.params.seed)
    logits = (torch.randn(len(seqs), VOCAB, generator=torch.Generator().manual_seed(7)) * 3
              ).to(device)
    picks = sampler(logits, seqs)
    raw = torch.log_softmax(logits, dim=-1)
    for row, seq in enumerate(seqs):
        adjusted = reference(logits[row], seq)
        if temperature == 0:
            expected = int(adjusted.argmax())
        else:
            probs = torch.softmax(adjusted / temperature, dim=-1)
            expected = int(torch.multinomial(probs, 1, generator=sampler.generator_for(
                seq.params.seed))[0])
        assert picks.tokens[row] == expected
        assert picks.logprobs[row] == pytest.approx(raw[row, expected].item())
        n = seq.params.top_logprobs
        if n:
            values, ids = raw[row].topk(n)
            assert [i for i, _ in picks.top_logprobs[row]] == ids.tolist()
            assert [v for _, v in picks.top_logprobs[row]] == pytest.approx(values.tolist())
        else:
            assert picks.top_logprobs[row] is None
    alone = Sampler(torch.device(device), seed=0)  # a seeded row without its neighbours
    seqs[4].generator = alone.generator_for(seqs[4].params.seed)
    assert alone(logits[4:5], [seqs[4]]).tokens == [picks.tokens[4]]


def test_logit_bias_forces_a_token_and_min_tokens_bans_the_stop_ids():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.zeros(2, VOCAB)
    logits[:, EOS] = 50
    forced = Sequence("a", [1, 2], SamplingParams(temperature=0, logit_bias={42: 100}), 0, 8)
    early = Sequence("b", [1, 2], SamplingParams(temperature=0, min_tokens=2), 1, 8)
    early.stop_ids |= {EOS}
    assert sampler(logits, [forced, early]).tokens[0] == 42
    assert sampler(logits, [forced, early]).tokens[1] != EOS
    early.token_ids += [9, 9]  # two tokens generated: EOS allowed again
    assert sampler(logits, [forced, early]).tokens[1] == EOS


def test_forks_draw_their_first_token_from_the_parent_row():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(3))
    greedy = SamplingParams(temperature=0)
    hot = SamplingParams(temperature=1.5, logprobs=True)
    parent = Sequence("p", [1, 2, 3], greedy, 0, 8)
    parent.forks = [Sequence("p", [1, 2, 3], greedy, 0, 8, index=j) for j in (1, 2)]
    other = Sequence("q", [4], hot, 1, 8)
    other.forks = [Sequence("q", [4], hot, 1, 8, index=j) for j in (1, 2, 3)]
    samples = sampler.sample(logits, [parent, other])
    assert [s.seq for s in samples] == [parent, *parent.forks, other, *other.forks]
    assert {s.token for s in samples[:3]} == {int(logits[0].argmax())}
    raw = torch.log_softmax(logits[1], dim=-1)
    assert all(s.logprob == pytest.approx(raw[s.token].item()) for s in samples[3:])
    assert len({s.token for s in samples[3:]}) > 1  # own draws, not one shared
