"""A no-cost engine core (``backend: synthetic``): tokens without a model, for measuring serving.

The serving layer's own ceiling is what it passes on when the engine costs nothing
(bench/serve_overhead.py). :class:`SyntheticCore` offers the engine-core calls that
:class:`~optgptq.engine.async_engine.AsyncLLMEngine` drives (``add_request``, ``abort_request``,
``step``, ``take_failures``, ``has_unfinished_requests``, ``stats``, ``pool``), so it is served
through exactly the same stream machinery as the real engine; only the model is gone:

- the model folder gives the tokenizer, the context length and the vocabulary; no weights load;
- output tokens cycle through a fixed English phrase (their text decoded once at start), so the
  text is real and costs nothing per token; sampling parameters do not change it (there is no
  distribution to sample), stop strings, stop token ids and ``max_tokens`` end it as in the engine;
  there is one choice per request (``n`` > 1 is refused) and no logprobs;
- ``step_time_s`` > 0: one token per running request per step, a step every ``step_time_s``
  (to emulate an accelerator's step time on a CPU); 0: every admitted request gets all of its
  tokens in one step ("tokens at once");
- at most ``max_num_seqs`` requests run; KV blocks are counted as the engine would hold them
  (prompt + output, ``block_size`` tokens a block, no prefix reuse) and requests wait while the
  pool is full.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from transformers import AutoTokenizer

from optgptq.config import EngineConfig
from optgptq.engine.block_pool import PoolStats
from optgptq.engine.outputs import EngineStats, RequestOutput
from optgptq.engine.sampling_params import SamplingParams
from optgptq.engine.sequence import RequestLimits, check_request
from optgptq.models.hub import resolve_model
from optgptq.models.loader import load_config

PHRASE = (" The quick brown fox jumps over the lazy dog, and the harbour town wakes slowly"
          " in winter while the bakers open their shutters.")
DEFAULT_BLOCKS = 4096


@dataclass
class _Seq:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    reported: int = 0
    emitted: int = 0


class SyntheticCore:
    """Engine core with a free model; see the module docstring."""

    def __init__(self, config: EngineConfig, step_time_s: float = 0.0) -> None:
        if step_time_s < 0:
            raise ValueError(f"step_time_s must be >= 0, got {step_time_s!r}")
        path = resolve_model(config.model)
        hf = load_config(path)
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.vocab_size = int(hf.vocab_size)
        self.max_model_len = int(config.max_model_len or hf.max_position_embeddings)
        self.step_time_s = step_time_s
        ids = self.tokenizer.encode(PHRASE, add_special_tokens=False)
        self._cycle = [(t, self.tokenizer.decode([t])) for t in ids]
        self.pool = _CountingPool(config.num_blocks or DEFAULT_BLOCKS, config.block_size)
        self.limits = RequestLimits(self.vocab_size, self.max_model_len, config.block_size,
                                    self.pool.num_blocks, 1, True)  # one choice per request
        self._waiting: deque[_Seq] = deque()
        self._running: OrderedDict[str, _Seq] = OrderedDict()
        self._next_step = 0.0

    # -- requests --------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, stream: bool = True) -> str:
        params = params or SamplingParams()
        ids = (self.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str)
               else list(prompt))
        max_tokens = check_request(ids, params, self.limits)
        if request_id in self._running or any(s.request_id == request_id for s in self._waiting):
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._waiting.append(_Seq(request_id, ids, params, max_tokens))
        return request_id

    def abort_request(self, request_id: str) -> bool:
        seq = self._running.pop(request_id, None)
        if seq is not None:
            self.pool.release(seq)
            return True
        for s in self._waiting:
            if s.request_id == request_id:
                self._waiting.remove(s)
                return True
        return False

    def has_unfinished_requests(self) -> bool:
        return bool(self._running or self._waiting)

    def take_failures(self) -> list[tuple[str, str]]:
        """None here: the phrase never fails (the engine core's interface)."""
        return []

    # -- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.step_time_s:
            delay = self._next_step - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._next_step = time.monotonic() + self.step_time_s
        while (self._waiting and len(self._running) < self.config.max_num_seqs
               and self.pool.take(self._waiting[0])):
            seq = self._waiting.popleft()
            self._running[seq.request_id] = seq
        outputs = []
        for seq in list(self._running.values()):
            reason = None
            for _ in range(1 if self.step_time_s else seq.max_tokens):
                reason = self._append(seq)
                if reason is not None:
                    break
            if reason is not None:
                del self._running[seq.request_id]
                self.pool.release(seq)
            outputs.append(self._output(seq, reason))
        return outputs

    def _append(self, seq: _Seq) -> str | None:
        token, text = self._cycle[len(seq.token_ids) % len(self._cycle)]
        seq.token_ids.append(token)
        seq.text += text
        p = seq.params
        for stop in p.stop:
            pos = seq.text.find(stop, max(0, len(seq.text) - len(text) - len(stop)))
            if pos != -1:
                seq.text = seq.text[:pos]
                return "stop"
        if token in p.stop_token_ids:
            return "stop"
        return "length" if len(seq.token_ids) >= seq.max_tokens else None

    def _output(self, seq: _Seq, reason: str | None) -> RequestOutput:
        finished = reason is not None
        hold = 0 if finished else max((len(s) for s in seq.params.stop), default=1) - 1
        end = max(seq.emitted, len(seq.text) - hold)
        delta_text, seq.emitted = seq.text[seq.emitted:end], end
        delta_ids, seq.reported = seq.token_ids[seq.reported:], len(seq.token_ids)
        return RequestOutput(seq.request_id, None, seq.prompt_token_ids, seq.text[:end],
                             seq.token_ids, delta_text, delta_ids, finished, reason)

    def stats(self) -> EngineStats:
        return EngineStats(waiting=len(self._waiting), running=len(self._running),
                           preemptions=0, pool=self.pool.stats())


class _CountingPool:
    """Block accounting without blocks: what the synthetic requests would hold."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.used = 0
        self.admitted_tokens = 0

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def take(self, seq: _Seq) -> bool:
        need = self.blocks_for(len(seq.prompt_token_ids) + seq.max_tokens)
        if self.used + need > self.num_blocks:
            return False
        self.used += need
        self.admitted_tokens += len(seq.prompt_token_ids)
        return True

    def release(self, seq: _Seq) -> None:
        self.used -= self.blocks_for(len(seq.prompt_token_ids) + seq.max_tokens)

    def drain_events(self) -> list:
        return []

    def stats(self) -> PoolStats:
        return PoolStats(num_blocks=self.num_blocks, free_blocks=self.num_blocks - self.used,
                         cached_blocks=0, used_blocks=self.used, prefix_hit_tokens=0,
                         prefix_miss_tokens=self.admitted_tokens, evictions=0)
