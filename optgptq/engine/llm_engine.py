"""The engine core: requests in, one scheduled step at a time, incremental outputs out.

``add_request`` validates and queues; ``step`` schedules a batch, runs it on the model runner,
forks waiting choices, appends sampled tokens, applies the stop conditions and retires finished
sequences; ``abort_request`` frees a request at once. Everything here is synchronous and
single-threaded; :mod:`optgptq.engine.async_engine` runs it in a background loop for the
serving layer.

A request of ``n`` choices (``SamplingParams.n``) is prefilled once: choice 0 is scheduled alone
and carries the others in its ``forks``; the step that computes its prompt's last token samples
every choice's first token from that one logits row (:meth:`Sampler.sample`), and the choices
then take references to its full prompt blocks and a copy of its partially filled one
(:meth:`BlockPool.fork`), joining the batch as sequences of their own. Outputs name their
choice (``RequestOutput.index``); the request ends when all of its choices have, and fails or
is aborted as a whole.

Structured output (``SamplingParams.structured``): the request's grammar is compiled on a worker
thread (:class:`~optgptq.engine.structured.GrammarCache`, cached by spec text); the request
enters the scheduler once it is ready (a failed compile fails the request alone), each choice
with its own matcher, which every appended token advances; a choice whose grammar is complete
finishes with ``stop``.
"""

from __future__ import annotations

import itertools
from concurrent.futures import FIRST_COMPLETED, Future, wait

from transformers import AutoTokenizer

from optgptq.config import EngineConfig
from optgptq.engine.block_pool import BlockPool
from optgptq.engine.detokenizer import IncrementalDetokenizer
from optgptq.engine.model_runner import ModelRunner
from optgptq.engine.outputs import EngineStats, RequestOutput
from optgptq.engine.sampler import Sample
from optgptq.engine.sampling_params import SamplingParams
from optgptq.engine.scheduler import Scheduler
from optgptq.engine.sequence import InvalidRequest, RequestLimits, Sequence, check_request
from optgptq.engine.structured import GrammarCache, matcher
from optgptq.models.hub import resolve_model

SEED_MODULUS = 1 << 64


class _Choice:
    """One sequence of a request, with its detokenizer and what its outputs reported."""

    def __init__(self, seq: Sequence, detok: IncrementalDetokenizer | None) -> None:
        self.seq = seq
        self.detok = detok
        self.reported_tokens = 0
        self.stop_reason: str | int | None = None


class _Request:
    def __init__(self, choices: list[_Choice], stream: bool) -> None:
        self.choices = choices
        self.stream = stream
        seq = choices[0].seq
        self.prompt_token_ids = seq.token_ids[:seq.num_prompt_tokens]  # shared by its outputs
        self.unfinished = len(choices)


class LLMEngine:
    def __init__(self, config: EngineConfig, record_cache_events: bool = False) -> None:
        self.config = config
        path = resolve_model(config.model)
        self.tokenizer = (None if config.skip_tokenizer_init else
                          AutoTokenizer.from_pretrained(str(path), local_files_only=True))
        self.runner = ModelRunner(config, path)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = int(self.runner.hf_config.vocab_size)
        self.pool = BlockPool(self.runner.num_blocks, config.block_size,
                              config.enable_prefix_caching, record_events=record_cache_events)
        self.scheduler = Scheduler(self.pool, config.max_num_seqs, config.max_num_batched_tokens)
        self.limits = RequestLimits(self.vocab_size, self.max_model_len, config.block_size,
                                    self.pool.num_blocks, config.max_num_seqs,
                                    self.tokenizer is not None)
        self.eos_token_ids = self._eos_ids(path)
        self._requests: dict[str, _Request] = {}
        self._failures: list[tuple[str, str]] = []
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        self._grammars: GrammarCache | None = None
        self._compiling: list[tuple[Future, str]] = []  # requests waiting for their grammar

    def _eos_ids(self, path) -> set[int]:
        from transformers import GenerationConfig

        ids: set[int] = set()
        try:
            eos = GenerationConfig.from_pretrained(str(path), local_files_only=True).eos_token_id
        except OSError:
            eos = getattr(self.runner.hf_config, "eos_token_id", None)
        for value in (eos, self.tokenizer and self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(value)
        return ids

    # -- requests -----------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, stream: bool = True) -> str:
        """Validate and queue a request; raises ValueError naming what is wrong. With ``stream``
        ``step`` reports it after every token, else each choice once it finishes."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if self.tokenizer is None and isinstance(prompt, str):
            raise InvalidRequest("this engine runs without a tokenizer (skip_tokenizer_init): "
                                 "prompts must be token ids", "prompt")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            text, ids = None, list(prompt)
        max_tokens = check_request(ids, params, self.limits, check_ids=text is None)
        arrival = next(self._arrivals)
        choices = [self._choice(request_id, ids, params, arrival, max_tokens, text, j)
                   for j in range(params.n)]
        choices[0].seq.forks = [c.seq for c in choices[1:]]
        self._requests[request_id] = _Request(choices, stream)
        if params.structured is None:
            self.scheduler.add(choices[0].seq)
        else:
            if self._grammars is None:
                self._grammars = GrammarCache(self.tokenizer, self.vocab_size,
                                              sorted(self.eos_token_ids))
            self._compiling.append((self._grammars.compile(params.structured), request_id))
        return request_id

    def _admit_compiled(self) -> None:
        """Requests whose grammar is ready enter the scheduler, each choice with a matcher."""
        waiting = []
        for future, request_id in self._compiling:
            req = self._requests.get(request_id)
            if req is None:                                   # aborted meanwhile
                continue
            if not future.done():
                waiting.append((future, request_id))
                continue
            error = future.exception()
            if error is not None:
                field = req.choices[0].seq.params.structured.field
                self.abort_request(request_id)
                self._failures.append((request_id, f"{field}: the grammar failed to compile: "
                                                   f"{error}"))
                continue
            for choice in req.choices:
                choice.seq.matcher = matcher(future.result())
            self.scheduler.add(req.choices[0].seq)
        self._compiling = waiting

    def _choice(self, request_id: str, ids: list[int], params: SamplingParams, arrival: int,
                max_tokens: int, text: str | None, index: int) -> _Choice:
        seq = Sequence(request_id, ids, params, arrival, max_tokens, text, index)
        if params.seed is not None:
            seq.generator = self.runner.make_generator(
                params.seed if index == 0 else (params.seed + index) % SEED_MODULUS)
        if not params.ignore_eos:
            seq.stop_ids |= self.eos_token_ids
        detok = (IncrementalDetokenizer(self.tokenizer, ids, params.stop)
                 if self.tokenizer is not None else None)
        return _Choice(seq, detok)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its blocks now; False if it is unknown or already done."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.abort(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def take_failures(self) -> list[tuple[str, str]]:
        """``(request_id, message)`` of the requests that failed alone since the last call (the
        step went on for the others); they are already aborted."""
        failures, self._failures = self._failures, []
        return failures

    # -- the step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; returns an output for every choice that finished, and for every
        streamed one that produced tokens."""
        if self._compiling:
            self._admit_compiled()
        batch = self.scheduler.schedule()
        if not batch:
            if self._compiling:  # only grammars to wait for: wait, but not for long
                wait([f for f, _ in self._compiling], timeout=0.01, return_when=FIRST_COMPLETED)
            return []
        samples = self.runner.execute(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.pool.cache_full_blocks(seq)
        for s in samples:
            if s.token < 0 and s.seq.request_id in self._requests:  # it fails alone
                self.abort_request(s.seq.request_id)
                self._failures.append((s.seq.request_id, "sampling failed: the request's "
                                       "next-token distribution has no mass or is not a number"))
            elif (s.token >= 0 and s.seq.matcher is not None
                  and s.seq.request_id in self._requests and not s.seq.matcher.accept_token(s.token)):
                self.abort_request(s.seq.request_id)
                self._failures.append((s.seq.request_id, "structured output: the grammar "
                                       "rejected the sampled token"))
        samples = [s for s in samples if s.seq.request_id in self._requests]
        for s in samples:
            if s.seq.forks:
                self._fork(s.seq)
        outputs = []
        for s in samples:
            req = self._requests[s.seq.request_id]
            choice = req.choices[s.seq.index]
            self._append(choice, s)
            if choice.seq.is_finished:
                req.unfinished -= 1
                if not req.unfinished:
                    del self._requests[s.seq.request_id]
            if req.stream or choice.seq.is_finished:
                outputs.append(self._output(req, choice))
        return outputs

    def _fork(self, parent: Sequence) -> None:
        """The choices waiting on ``parent``, whose prompt is now computed, become sequences of
        their own on its blocks (or, where the pool has no block for the copy, wait to
        recompute the prompt)."""
        for child in parent.forks:
            pairs = self.pool.fork(parent, child)
            if pairs:
                self.runner.copy_blocks(pairs)
            self.scheduler.add_forked(child)
        parent.forks = []

    def _append(self, choice: _Choice, sample: Sample) -> None:
        seq = choice.seq
        seq.token_ids.append(sample.token)
        if seq.params.logprobs:
            seq.logprobs.append(sample.logprob)
            if seq.params.top_logprobs:
                seq.top_logprobs.append(sample.top_logprobs)
        reason = self._check_stop(choice, sample.token)
        if reason is None and seq.matcher is not None and seq.matcher.is_terminated():
            choice.stop_reason, reason = sample.token, "stop"   # the grammar is complete
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def _check_stop(self, choice: _Choice, token: int) -> str | None:
        """Stop strings, stop ids and EOS count only past the first ``min_tokens`` tokens (the
        sampler bans the ids until then)."""
        seq = choice.seq
        counts = seq.num_output_tokens > seq.params.min_tokens
        stop_str = choice.detok.add(token, counts) if choice.detok is not None else None
        if stop_str is not None:
            choice.stop_reason = stop_str
            return "stop"
        if counts and token in seq.stop_ids:
            choice.stop_reason = token
            return "stop"
        if seq.num_output_tokens >= seq.max_tokens:
            return "length"
        return None

    def _output(self, req: _Request, choice: _Choice) -> RequestOutput:
        seq = choice.seq
        finished = seq.is_finished
        out_ids = seq.output_token_ids
        delta_ids = out_ids[choice.reported_tokens:]
        choice.reported_tokens = len(out_ids)
        detok = choice.detok
        delta_text = detok.delta(finished) if detok is not None else ""
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=req.prompt_token_ids,
            text=detok.text[:detok.emitted] if detok is not None else "",
            token_ids=out_ids,
            delta_text=delta_text,
            delta_token_ids=delta_ids,
            finished=finished,
            finish_reason=seq.finish_reason,
            stop_reason=choice.stop_reason,
            logprobs=list(seq.logprobs) if seq.params.logprobs else None,
            num_cached_tokens=seq.num_cached_tokens,
            top_logprobs=list(seq.top_logprobs) if seq.params.top_logprobs else None,
            index=seq.index,
        )

    def stats(self) -> EngineStats:
        return EngineStats(waiting=len(self.scheduler.waiting),
                           running=len(self.scheduler.running),
                           preemptions=self.scheduler.num_preemptions,
                           pool=self.pool.stats())
