"""vLLM's V1 async engine behind the serving layer's engine interface (``backend: vllm``).

:class:`VLLMEngine` offers what :class:`deployments.replica.EngineReplica` uses of the native
:class:`~optgptq.engine.async_engine.AsyncLLMEngine`: ``generate`` (an async stream of
:class:`~optgptq.engine.llm_engine.RequestOutput` deltas; closing it aborts the request in vLLM,
which frees its blocks), ``stats``, ``drain_cache_events``, ``model_info`` and ``shutdown``.

- Settings: the ``engine:`` section of the YAML, mapped onto vLLM's engine arguments by
  :func:`vllm_engine_args` (same block size, KV budget, batch limits, context, prefix caching,
  seed), plus the application's ``vllm:`` mapping of further vLLM arguments (e.g.
  ``enforce_eager``). On CPU the KV budget is always explicit (``kv_cache_bytes``, default
  2 GiB as for the native engine) and OpenMP threads are left unbound
  (``VLLM_CPU_OMP_THREADS_BIND=nobind`` unless set), so several replicas on one host use the
  thread count Ray gives each actor instead of all binding the same cores.
- Stats: a vLLM stat logger receives the scheduler's stats every step (running and waiting
  requests, KV usage, prefix-cache queries and hits, preemptions).
- Cache events: vLLM publishes its KV cache events over ZeroMQ (``kv_events_config``, one IPC
  socket per engine); a subscriber thread decodes them and maps them onto the router's block
  hashes (:mod:`optgptq.serving.kv_events`). Lost batches (sequence gaps) are counted.

Checkpoints: float ones, and GPTQ ones (``quant_method: gptq``) which vLLM loads with its own
GPTQ layers. vLLM's CPU kernel for GPTQ takes 4-bit symmetric weights and float16/bfloat16
activations, so on CPU ``dtype: auto`` means float32 for a float checkpoint (as the native
engine) and bfloat16 for a GPTQ one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import tempfile
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any

from optgptq.config import EngineConfig
from optgptq.engine.block_pool import PoolStats
from optgptq.engine.outputs import EngineStats, RequestOutput
from optgptq.engine.sampling_params import SamplingParams
from optgptq.engine.sequence import InvalidRequest, RequestLimits
from optgptq.models.hub import resolve_model
from optgptq.serving.kv_events import VLLMEventTranslator

log = logging.getLogger(__name__)
CPU_KV_BYTES = 2 << 30
"""The native engine's CPU default pool, used for vLLM on CPU too."""
VLLM_QUANTIZATION = {"none": None, "gptq": "gptq"}
"""Checkpoint methods vLLM loads, by this project's name -> vLLM's ``quantization``."""
MANAGED = ("model", "kv_events_config", "disable_log_stats")
"""vLLM arguments the adapter sets itself."""
SHARED = ("dtype", "quantization", "block_size", "max_num_seqs", "max_num_batched_tokens",
          "max_model_len", "enable_prefix_caching", "seed", "kv_cache_memory_bytes",
          "num_gpu_blocks_override")
"""vLLM arguments that come from the ``engine:`` settings (see :func:`vllm_engine_args`)."""
CPU_BLOCK_MULTIPLE = 32
"""vLLM's CPU attention backend takes block sizes that are multiples of this."""
INSTALL_HINT = ("backend: vllm needs vLLM in the Python that runs the engine replicas: "
                "`make vllm` (CPU, into .venv-vllm) or the vLLM build of your accelerator's "
                "vendor")


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def check_extra_args(extra: Mapping[str, Any]) -> None:
    """ValueError for a ``vllm:`` argument that optgptq or the ``engine:`` settings own."""
    for key in extra:
        if key in MANAGED:
            raise ValueError(f"vllm.{key}: set by optgptq (model: at the top level, the rest "
                             f"internally)")
        if key in SHARED:
            raise ValueError(f"vllm.{key}: set the matching engine: setting instead (both "
                             f"backends share them)")


def vllm_engine_args(config: EngineConfig, extra: Mapping[str, Any] | None = None,
                     on_cpu: bool = True) -> dict[str, Any]:
    """vLLM engine arguments for ``config`` (the ``engine:`` settings) plus ``extra``.

    Raises ValueError naming the setting that vLLM cannot honour.
    """
    from optgptq.models.loader import load_config  # torch: only where vLLM runs
    from optgptq.models.quantization import method_of

    path = resolve_model(config.model)
    qc = getattr(load_config(path, config.quantization), "quantization_config", None)
    method = method_of(qc if isinstance(qc, dict) or qc is None else qc.to_dict()) or "none"
    if method not in VLLM_QUANTIZATION:
        raise ValueError(f"quantization: backend vllm serves float and gptq checkpoints; "
                         f"{str(path)!r} is {method}, a format of this project only")
    if config.device.startswith("cuda:"):
        raise ValueError("device: vLLM places its engine itself (set CUDA_VISIBLE_DEVICES); "
                         "use auto, cpu or cuda with backend vllm")
    if (config.device == "cpu") != on_cpu and config.device != "auto":
        raise ValueError(f"device: {config.device!r}, but the installed vLLM build runs on "
                         f"{'the CPU' if on_cpu else 'an accelerator'}")
    dtype = config.dtype
    if on_cpu and dtype == "auto":
        dtype = "float32" if method == "none" else "bfloat16"
    if on_cpu and config.block_size % CPU_BLOCK_MULTIPLE:
        raise ValueError(f"block_size: vLLM's CPU attention needs a multiple of "
                         f"{CPU_BLOCK_MULTIPLE}, got {config.block_size}")
    if on_cpu and method == "gptq" and dtype == "float32":
        raise ValueError("dtype: vLLM's GPTQ layers compute in float16 or bfloat16; set "
                         "engine.dtype to bfloat16, float16 or auto")
    args: dict[str, Any] = {
        "model": str(path), "dtype": dtype, "quantization": VLLM_QUANTIZATION[method],
        "block_size": config.block_size, "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "max_model_len": config.max_model_len,
        "enable_prefix_caching": config.enable_prefix_caching, "seed": config.seed,
        "kv_cache_memory_bytes": config.kv_cache_bytes or (CPU_KV_BYTES if on_cpu else None),
        "num_gpu_blocks_override": config.num_blocks,
    }
    assert set(args) == {"model", *SHARED}
    check_extra_args(extra or {})
    return {**args, **(extra or {})}


class VLLMEngine:
    """One vLLM ``AsyncLLM`` (its engine core runs in a child process)."""

    def __init__(self, config: EngineConfig, extra_args: Mapping[str, Any] | None = None,
                 record_cache_events: bool = False) -> None:
        if not vllm_available():
            raise RuntimeError(INSTALL_HINT)
        from vllm.config import KVEventsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = current_platform.is_cpu()
        args = vllm_engine_args(config, extra_args, on_cpu)
        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        if unknown := sorted(set(args) - known):
            raise ValueError(f"vllm: unknown vLLM engine argument(s): {', '.join(unknown)}")
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        self._translator = VLLMEventTranslator(config.block_size)
        self._events: deque[tuple[str, int]] = deque()
        self._stopped = threading.Event()
        self._subscriber = None
        self.event_gaps = 0
        if record_cache_events:
            self._ipc = os.path.join(tempfile.gettempdir(), f"optgptq-kv-{uuid.uuid4().hex[:12]}")
            args["kv_events_config"] = KVEventsConfig(
                enable_kv_cache_events=True, publisher="zmq", endpoint=f"ipc://{self._ipc}")
            self._subscriber = threading.Thread(target=self._subscribe, name="vllm-kv-events",
                                                daemon=True)
            self._subscriber.start()
        self._in_flight = 0
        self._tasks: dict[str, asyncio.Task] = {}
        self._sched = None          # latest SchedulerStats
        self._hits = self._queries = self._preemptions = 0
        engine_args = AsyncEngineArgs(**args, disable_log_stats=True)
        self.llm = AsyncLLM.from_engine_args(engine_args, stat_loggers=[_stat_logger(self)])
        cache = self.llm.vllm_config.cache_config
        self.num_blocks = int(cache.num_gpu_blocks)
        self.block_size = int(cache.block_size)
        self.max_model_len = int(self.llm.model_config.max_model_len)
        self.vocab_size = int(self.llm.model_config.get_vocab_size())

    # -- requests ----------------------------------------------------------------------------
    async def generate(self, prompt: list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream deltas; InvalidRequest for a request vLLM rejects. Closing the stream aborts."""
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt

        if not isinstance(prompt, list) or not prompt:
            raise InvalidRequest("prompt must be a non-empty list of token ids", "prompt")
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        try:
            sampling = _sampling_params(params)
        except InvalidRequest:
            raise
        except (ValueError, VLLMClientError) as exc:  # vLLM's messages name no field we know
            raise InvalidRequest(str(exc)) from None
        prompt_ids = list(prompt)
        prompt = TokensPrompt(prompt_token_ids=prompt_ids)
        if params.cache_salt is not None:  # vLLM's own namespace; such blocks are not routed
            prompt["cache_salt"] = params.cache_salt
        stream = self.llm.generate(prompt, sampling,
                                   request_id)
        self._in_flight += 1
        text, ids, logprobs, top = "", [], [], []
        try:
            async for out in stream:
                c = out.outputs[0]
                text += c.text
                ids += c.token_ids
                if params.logprobs:
                    new_logprobs, new_top = vllm_logprobs(c.token_ids, c.logprobs or [],
                                                          params.top_logprobs)
                    logprobs += new_logprobs
                    top += new_top
                yield RequestOutput(request_id, None, prompt_ids, text, list(ids), c.text,
                                    list(c.token_ids), out.finished,
                                    c.finish_reason if out.finished else None, c.stop_reason,
                                    list(logprobs) if params.logprobs else None,
                                    out.num_cached_tokens or 0,
                                    list(top) if params.top_logprobs else None)
        except VLLMClientError as exc:
            raise InvalidRequest(str(exc)) from None
        finally:
            self._in_flight -= 1
            await stream.aclose()  # aborts in vLLM if unfinished

    def submit(self, prompt: list[int], params: SamplingParams | None, request_id: str,
               on_delta):
        """The native engine's ``submit`` (optgptq.engine.async_engine): deltas to ``on_delta``,
        accepted at the first output (vLLM validates as it starts the request)."""
        from optgptq.engine.async_engine import Submission
        from optgptq.engine.core_loop import delta

        sub = Submission(request_id, asyncio.get_running_loop(), on_delta)

        async def run() -> None:
            first = True
            try:
                async for out in self.generate(prompt, params, request_id):
                    sub._put(delta(out, first))
                    first = False
            except asyncio.CancelledError:
                sub._fail(RuntimeError("aborted"))
            except Exception as exc:
                sub._fail(exc)

        self._tasks[request_id] = task = asyncio.get_running_loop().create_task(run())
        task.add_done_callback(lambda _: self._tasks.pop(request_id, None))
        return sub

    def abort(self, request_id: str) -> None:
        """Stop a request (no-op once it finished); vLLM frees its blocks."""
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    # -- state -------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Requests in this engine and its pool. Waiting = requests here that vLLM's last step
        did not run; block counts from vLLM's KV usage and its cache events."""
        s = self._sched
        running = min(s.num_running_reqs, self._in_flight) if s else 0
        used = round(s.kv_cache_usage * self.num_blocks) if s and self._in_flight else 0
        pool = PoolStats(num_blocks=self.num_blocks, free_blocks=self.num_blocks - used,
                         cached_blocks=len(self._translator), used_blocks=used,
                         prefix_hit_tokens=self._hits,
                         prefix_miss_tokens=self._queries - self._hits, evictions=0)
        return EngineStats(waiting=self._in_flight - running, running=running,
                           preemptions=self._preemptions, pool=pool)

    def model_info(self) -> dict:
        """What requests are validated against (as the native core's): one choice per request
        (:func:`_sampling_params`)."""
        return {"max_model_len": self.max_model_len, "num_blocks": self.num_blocks,
                "vocab_size": self.vocab_size,
                "limits": RequestLimits(self.vocab_size, self.max_model_len, self.block_size,
                                        self.num_blocks, 1, True)}

    def drain_cache_events(self) -> list[tuple[str, int]]:
        """Router ``("add" | "evict", hash)`` events since the last call, in order."""
        events = []
        while self._events:
            events.append(self._events.popleft())
        return events

    def shutdown(self) -> None:
        self._stopped.set()
        self.llm.shutdown()
        if self._subscriber is not None:
            self._subscriber.join(timeout=5)
            if os.path.exists(self._ipc):
                os.unlink(self._ipc)

    # -- vLLM callbacks ----------------------------------------------------------------------
    def _record(self, scheduler_stats, iteration_stats) -> None:
        if scheduler_stats is not None:
            self._sched = scheduler_stats
            p = scheduler_stats.prefix_cache_stats
            self._hits += p.hits
            self._queries += p.queries
        if iteration_stats is not None:
            self._preemptions += iteration_stats.num_preempted_reqs

    def _subscribe(self) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(f"ipc://{self._ipc}")
        expected = 0
        try:
            while not self._stopped.is_set():
                if not sock.poll(200):
                    continue
                _, seq, payload = sock.recv_multipart()
                seq = int.from_bytes(seq, "big", signed=True)
                if seq < 0:
                    continue
                if seq != expected:
                    self.event_gaps += 1
                    log.warning("vLLM KV events %d..%d lost; the router index may be stale",
                                expected, seq - 1)
                expected = seq + 1
                self._events.extend(self._translator.translate(decoder.decode(payload).events))
        finally:
            sock.close(linger=0)


def _sampling_params(p: SamplingParams):
    """vLLM's parameters for ``p``. ``n`` > 1 is refused: this adapter follows one output
    stream per request (vLLM's own n would need its per-choice deltas mapped onto choices)."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    if p.n > 1:
        raise InvalidRequest("n: more than one choice per request is not available with "
                             "backend vllm; send the request n times", "n")
    return VSamplingParams(n=1, max_tokens=p.max_tokens, min_tokens=p.min_tokens,
                           temperature=p.temperature, top_k=max(p.top_k, 0), top_p=p.top_p,
                           seed=p.seed, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
                           ignore_eos=p.ignore_eos, presence_penalty=p.presence_penalty,
                           frequency_penalty=p.frequency_penalty,
                           repetition_penalty=p.repetition_penalty,
                           logit_bias=dict(p.logit_bias) or None,
                           logprobs=p.top_logprobs if p.logprobs else None,
                           output_kind=RequestOutputKind.DELTA,
                           **_structured_outputs(p))


def _structured_outputs(p: SamplingParams) -> dict:
    """vLLM's ``structured_outputs`` for ``p.structured`` (its own backend, xgrammar by default,
    then compiles it), as compact JSON as our engine makes; nothing where there is none."""
    spec = p.structured
    if spec is None:
        return {}
    from vllm.sampling_params import StructuredOutputsParams

    if spec.kind == "json_object":
        kind = {"json_object": True}
    elif spec.kind in ("json_schema", "choice"):
        kind = {"json" if spec.kind == "json_schema" else "choice": json.loads(spec.spec)}
    else:
        kind = {spec.kind: spec.spec}
    return {"structured_outputs": StructuredOutputsParams(
        **kind, disable_any_whitespace=True, disable_additional_properties=spec.strict)}


def vllm_logprobs(token_ids, steps, top_n: int) -> tuple[list[float], list[list | None]]:
    """Our logprobs from vLLM's: ``steps`` has one ``{token id: Logprob(logprob, rank)}`` per
    token (its ``top_n`` best by rank and the chosen one, raw logprobs as vLLM's default
    ``logprobs_mode``); returns the chosen tokens' logprobs and each step's ``top_n`` best
    ``(id, logprob)`` (None where ``top_n`` is 0)."""
    chosen, top = [], []
    for token, step in zip(token_ids, steps):
        chosen.append(step[token].logprob)
        best = sorted((lp.rank, i, lp.logprob) for i, lp in step.items() if lp.rank <= top_n)
        top.append([(i, v) for _, i, v in best] if top_n else None)
    return chosen, top


def _stat_logger(engine: VLLMEngine):
    """A vLLM stat logger factory that hands every step's stats to ``engine``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Recorder(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                   engine_idx: int = 0) -> None:
            engine._record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return _Recorder
