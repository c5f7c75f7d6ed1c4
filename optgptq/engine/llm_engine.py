"""The engine core: requests in, one scheduled step at a time, incremental outputs out.

``add_request`` validates and queues; ``step`` schedules a batch, runs it on the model runner,
appends sampled tokens, applies the stop conditions and retires finished sequences;
``abort_request`` frees a request at once. Everything here is synchronous and single-threaded;
:mod:`optgptq.engine.async_engine` runs it in a background loop for the serving layer.
"""

from __future__ import annotations

import itertools

from transformers import AutoTokenizer

from optgptq.config import EngineConfig
from optgptq.engine.block_pool import BlockPool
from optgptq.engine.detokenizer import IncrementalDetokenizer
from optgptq.engine.model_runner import ModelRunner
from optgptq.engine.outputs import EngineStats, RequestOutput
from optgptq.engine.sampling_params import SamplingParams
from optgptq.engine.scheduler import Scheduler
from optgptq.engine.sequence import Sequence, check_request
from optgptq.models.hub import resolve_model


class _Request:
    def __init__(self, seq: Sequence, detok: IncrementalDetokenizer | None, stream: bool) -> None:
        self.seq = seq
        self.detok = detok
        self.stream = stream
        self.prompt_token_ids = seq.token_ids[:seq.num_prompt_tokens]  # shared by its outputs
        self.reported_tokens = 0
        self.stop_reason: str | int | None = None


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
        self.eos_token_ids = self._eos_ids(path)
        self._requests: dict[str, _Request] = {}
        self._failures: list[tuple[str, str]] = []
        self._arrivals = itertools.count()
        self._ids = itertools.count()

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
        ``step`` reports it after every token, else only once it finishes."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if self.tokenizer is None and (isinstance(prompt, str) or params.stop):
            raise ValueError("this engine runs without a tokenizer (skip_tokenizer_init): "
                             "prompts must be token ids and stop strings are not available")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            text, ids = None, list(prompt)
        max_tokens = check_request(ids, params, self.vocab_size, self.max_model_len,
                                   self.pool.block_size, self.pool.num_blocks,
                                   check_ids=text is None)
        seq = Sequence(request_id, ids, params, next(self._arrivals), max_tokens, text)
        if params.seed is not None:
            seq.generator = self.runner.make_generator(params.seed)
        detok = (IncrementalDetokenizer(self.tokenizer, ids, params.stop)
                 if self.tokenizer is not None else None)
        self._requests[request_id] = _Request(seq, detok, stream)
        self.scheduler.add(seq)
        return request_id

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
        """Run one batch; returns an output for every request that finished, and for every
        streamed one that produced tokens."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        samples = self.runner.execute(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.pool.cache_full_blocks(seq)
        outputs = []
        for i, token, logprob in samples:
            seq = batch.seqs[i]
            req = self._requests[seq.request_id]
            if token < 0:  # its distribution could not be sampled: it fails alone
                self.abort_request(seq.request_id)
                self._failures.append((seq.request_id, "sampling failed: the request's "
                                       "next-token distribution has no mass or is not a number"))
                continue
            seq.token_ids.append(token)
            if logprob is not None and seq.params.logprobs:
                seq.logprobs.append(logprob)
            reason = self._check_stop(req, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                del self._requests[seq.request_id]
            if req.stream or reason is not None:
                outputs.append(self._output(req))
        return outputs

    def _check_stop(self, req: _Request, token: int) -> str | None:
        seq, params = req.seq, req.seq.params
        stop_str = req.detok.add(token) if req.detok is not None else None
        if stop_str is not None:
            req.stop_reason = stop_str
            return "stop"
        if token in params.stop_token_ids:
            req.stop_reason = token
            return "stop"
        if not params.ignore_eos and token in self.eos_token_ids:
            req.stop_reason = token
            return "stop"
        if seq.num_output_tokens >= seq.max_tokens:
            return "length"
        return None

    def _output(self, req: _Request) -> RequestOutput:
        seq = req.seq
        finished = seq.is_finished
        out_ids = seq.output_token_ids
        delta_ids = out_ids[req.reported_tokens:]
        req.reported_tokens = len(out_ids)
        delta_text = req.detok.delta(finished) if req.detok is not None else ""
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=req.prompt_token_ids,
            text=req.detok.text[:req.detok.emitted] if req.detok is not None else "",
            token_ids=out_ids,
            delta_text=delta_text,
            delta_token_ids=delta_ids,
            finished=finished,
            finish_reason=seq.finish_reason,
            stop_reason=req.stop_reason,
            logprobs=list(seq.logprobs) if seq.params.logprobs else None,
            num_cached_tokens=seq.num_cached_tokens,
        )

    def stats(self) -> EngineStats:
        return EngineStats(waiting=len(self.scheduler.waiting),
                           running=len(self.scheduler.running),
                           preemptions=self.scheduler.num_preemptions,
                           pool=self.pool.stats())
