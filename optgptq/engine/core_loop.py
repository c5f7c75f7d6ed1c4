"""The engine core's loop, wherever it runs (a thread or a child process), and what crosses it.

An engine core (:class:`~optgptq.engine.llm_engine.LLMEngine`, or the model-free
:class:`~optgptq.engine.synthetic_core.SyntheticCore`) is synchronous; :func:`run` drives it for
asynchronous callers, who talk to it only through messages, so the same loop serves a thread of
the caller's process and a child process (:mod:`optgptq.engine.core_process`).

Commands in (plain tuples): ``("add", request_id, prompt, SamplingParams)``,
``("abort", request_id)``, ``("stop",)``.

Out, once per turn of the loop in which anything happened (commands taken or a step run), one
:data:`Batch` tuple ``(accepted, deltas, errors, stats, cache_events)``:

- ``accepted``: the ids of the requests the core took this turn;

- ``deltas``: one :data:`Delta` per choice of a request that produced tokens or finished in
  the step: ``(request_id, text, token_ids, finished, finish_reason, stop_reason, logprobs,
  prompt_token_ids, num_cached_tokens, top_logprobs, index)``, the new part only
  (``prompt_token_ids`` in a choice's first delta only, else None; ``logprobs`` and
  ``top_logprobs`` None unless asked for; ``index``: the choice, 0 .. n-1; ``finished``: that
  choice's end, the request's once each of its choices has sent one);
- ``errors``: ``(request_id, kind, message, param)``; kind ``invalid`` (the core refused the
  request: its ValueError; ``param``: the field at fault, if it names one), ``failed`` (the core failed it alone, ``take_failures``; or a step raised:
  every request in flight fails, the loop goes on) or ``stopped`` (the engine shut down);
- ``stats``: :class:`~optgptq.engine.llm_engine.EngineStats` after the turn;
- ``cache_events``: the block pool's ``("add" | "evict", hash)`` events of the turn.

One message per step, whatever the batch size: the cost of crossing to the callers does not grow
with the number of requests, and the loop never waits for its consumers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from optgptq.config import EngineConfig

log = logging.getLogger(__name__)

CORES = ("native", "synthetic")
Delta = tuple
Batch = tuple


def build_core(kind: str, config: EngineConfig, options: dict[str, Any] | None = None,
               record_cache_events: bool = False):
    """The engine core ``kind`` (``native``: the engine; ``synthetic``: no model)."""
    if kind == "native":
        from optgptq.engine.llm_engine import LLMEngine

        if options:
            raise ValueError(f"the native engine takes no core options, got {sorted(options)}")
        return LLMEngine(config, record_cache_events=record_cache_events)
    if kind == "synthetic":
        from optgptq.engine.synthetic_core import SyntheticCore

        return SyntheticCore(config, **(options or {}))
    raise ValueError(f"engine core must be one of {', '.join(CORES)}, got {kind!r}")


def model_info(core) -> dict:
    """What requests are validated against: context length, pool size, vocabulary."""
    info = {"max_model_len": core.max_model_len, "num_blocks": core.pool.num_blocks,
            "vocab_size": core.vocab_size, "limits": core.limits}
    runner = getattr(core, "runner", None)
    if runner is not None:
        info["startup"] = dict(runner.startup)
    return info


def run(core, receive: Callable[[bool], list[tuple]], emit: Callable[[Batch], None]) -> None:
    """Take commands and step ``core`` until a stop command; ``receive(block)`` returns the
    commands waiting (blocking for one when ``block``), ``emit`` sends a batch out."""
    live: dict[str, list] = {}  # request id -> per choice: False (no delta yet), True, None (done)
    while True:
        commands = receive(not core.has_unfinished_requests())
        errors: list[tuple[str, str, str, str | None]] = []
        accepted: list[str] = []
        for cmd in commands:
            if cmd[0] == "add":
                _, rid, prompt, params = cmd
                try:
                    core.add_request(prompt, params, rid)
                    live[rid] = [False] * params.n
                    accepted.append(rid)
                except ValueError as exc:
                    errors.append((rid, "invalid", str(exc), getattr(exc, "param", None)))
            elif cmd[0] == "abort":
                core.abort_request(cmd[1])
                live.pop(cmd[1], None)
            elif cmd[0] == "stop":
                for rid in live:
                    core.abort_request(rid)
                errors += [(rid, "stopped", "engine is shut down", None) for rid in live]
                emit((accepted, [], errors, core.stats(), core.pool.drain_events()))
                return
        if accepted or errors:  # say so now, not after the step (a prefill can take seconds)
            emit((accepted, [], errors, core.stats(), core.pool.drain_events()))
            accepted, errors = [], []
        deltas: list[Delta] = []
        if core.has_unfinished_requests():
            try:
                outputs = core.step()
            except Exception as exc:  # keep serving: fail only the requests in flight
                log.exception("engine step failed; failing in-flight requests")
                for rid in live:
                    core.abort_request(rid)
                errors += [(rid, "failed", f"engine step failed: {exc}", None) for rid in live]
                live.clear()
                outputs = []
            for rid, message in core.take_failures():  # one request's own failure
                if live.pop(rid, None) is not None:  # (not already failed by a raising step)
                    errors.append((rid, "failed", message, None))
            for out in outputs:
                choices = live.get(out.request_id)
                first = choices is not None and choices[out.index] is False
                if choices is not None:
                    choices[out.index] = None if out.finished else True
                    if not any(c is not None for c in choices):
                        del live[out.request_id]
                deltas.append(delta(out, first))
        if commands or deltas or errors:
            emit((accepted, deltas, errors, core.stats(), core.pool.drain_events()))


def delta(out, first: bool) -> Delta:
    """The :data:`Delta` of an output (``first``: its choice's first)."""
    n = len(out.delta_token_ids)
    return (out.request_id, out.delta_text, out.delta_token_ids, out.finished,
            out.finish_reason, out.stop_reason,
            out.logprobs[len(out.logprobs) - n:] if out.logprobs is not None else None,
            out.prompt_token_ids if first else None, out.num_cached_tokens,
            out.top_logprobs[len(out.top_logprobs) - n:] if out.top_logprobs is not None
            else None, out.index)
