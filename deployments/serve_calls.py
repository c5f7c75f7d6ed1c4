"""How this project's processes call Serve deployments: the transport, and background tasks.

- :data:`TRANSPORT`: handle options for Serve's gRPC transport to replicas instead of Ray object
  references: a streamed message costs about a quarter of the CPU time on either side
  (bench/serve_overhead.py's notes).
- :func:`background`: a task that runs outside any request's context. Serve reads a request id
  from a context variable when a handle call is made and reuses it if set; a long-lived task
  started while serving one request (a server, a token channel, an index stream) would
  otherwise lend that request's id to every call it makes, and the routers, which track calls
  by that id, would count them as one.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine

TRANSPORT = {"_by_reference": False, "request_serialization": "pickle",
             "response_serialization": "pickle"}


def background(coro: Coroutine) -> asyncio.Task:
    """``coro`` as a task of the running loop, in a fresh (empty) context."""
    return contextvars.Context().run(asyncio.get_running_loop().create_task, coro)
