"""The engine core in a child process: its own interpreter, so its loop never waits for the GIL.

A serving replica's process is busy with per-request Python work (the serving framework, the
transport, streams); an engine core stepping in a thread of that process competes with it for
the interpreter lock, and every step grows by the time it waits. :class:`CoreProcess` starts
``python -m optgptq.engine.core_process FD`` instead: a plain child interpreter (no ``fork`` of
a process that runs threads, no re-import of the parent's ``__main__``), joined to the parent
by a socket pair that carries pickled messages (:mod:`optgptq.engine.core_loop`: commands in,
one batch per step out).

- Start: the parent sends ``(kind, config, options, record_cache_events)``; the child builds the
  core, warms it up (:func:`warm_up`: one short request through a prefill and a decode step, so
  that one-time costs such as kernel compiles are paid before the first client's request) and
  answers ``("ready", model_info)`` or ``("error", traceback text)``, which the parent raises as
  RuntimeError. A serving replica is constructed, and so routable, only once this answered.
- The child inherits the parent's environment (accelerator visibility, thread counts) and
  ``sys.path``; it dies with the parent (``PR_SET_PDEATHSIG`` on Linux, and the socket's end of
  file everywhere).
- A reader thread in the parent hands every batch to ``on_batch``; when the child is gone it
  hands ``None`` once.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection

from optgptq.config import EngineConfig

_PROTOCOL = pickle.HIGHEST_PROTOCOL


class CoreProcess:
    """Parent side: start the child, send it commands, receive its batches on a thread."""

    def __init__(self, kind: str, config: EngineConfig, options: dict | None,
                 record_cache_events: bool, on_batch: Callable[[tuple | None], None]) -> None:
        t0 = time.perf_counter()
        mine, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "optgptq.engine.core_process", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self._conn = Connection(mine.detach())
        self._lock = threading.Lock()
        self.send((kind, config, options, record_cache_events))
        try:
            status, payload = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            status, payload = "error", f"exited with code {self.proc.wait()}"
        if status != "ready":
            self.proc.kill()
            raise RuntimeError(f"engine process failed to start: {payload}")
        self.model_info: dict = payload
        self.model_info["startup"] = {"process_s": time.perf_counter() - t0,
                                      **payload.get("startup", {})}
        self._on_batch = on_batch
        self._reader = threading.Thread(target=self._read, name="optgptq-engine-reader",
                                        daemon=True)
        self._reader.start()

    def send(self, command: tuple) -> None:
        data = pickle.dumps(command, _PROTOCOL)
        with self._lock:
            self._conn.send_bytes(data)

    def _read(self) -> None:
        try:
            while True:
                self._on_batch(pickle.loads(self._conn.recv_bytes()))
        except (EOFError, OSError):
            pass
        self._on_batch(None)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the child (it fails what is in flight), wait for it, kill it if it hangs."""
        try:
            self.send(("stop",))
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout)
        self._conn.close()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:          # the parent died before the call
            os._exit(1)


def warm_up(core) -> float:
    """Run one request of a few tokens (shorter than a block: nothing enters the prefix cache)
    through the core; returns the seconds it took. RuntimeError if the core cannot serve it."""
    from optgptq.engine.sampling_params import SamplingParams

    t0 = time.perf_counter()
    core.add_request([1, 2], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                     "optgptq-warmup")
    while core.has_unfinished_requests():
        core.step()
    failures = core.take_failures()
    if failures:
        raise RuntimeError(f"the warm-up request failed: {failures[0][1]}")
    core.pool.drain_events()
    return time.perf_counter() - t0


def main(fd: int) -> int:
    """Child side: build the core, then run its loop over the socket."""
    from optgptq.engine import core_loop

    _die_with_parent()
    conn = Connection(fd)
    kind, config, options, record_cache_events = pickle.loads(conn.recv_bytes())
    try:
        core = core_loop.build_core(kind, config, options, record_cache_events)
        warmup_s = warm_up(core)
    except BaseException:
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc()), _PROTOCOL))
        return 1
    info = core_loop.model_info(core)
    info["startup"] = {**info.get("startup", {}), "warmup_s": warmup_s}
    conn.send_bytes(pickle.dumps(("ready", info), _PROTOCOL))

    def receive(block: bool) -> list[tuple]:
        commands = []
        try:
            if block:
                conn.poll(None)
            while conn.poll(0):
                commands.append(pickle.loads(conn.recv_bytes()))
        except (EOFError, OSError):  # the parent is gone
            commands.append(("stop",))
        return commands

    def emit(batch: tuple) -> None:
        try:
            conn.send_bytes(pickle.dumps(batch, _PROTOCOL))
        except OSError:
            pass  # the parent is gone; the next receive stops the loop

    core_loop.run(core, receive, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
