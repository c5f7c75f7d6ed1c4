"""Paged attention on the CPU: a native kernel that reads the cache's blocks in place.

The PyTorch reference (:mod:`optgptq_kernels.paged_attention`) gathers each sequence's blocks
into a contiguous copy and runs SDPA over it: the KV bytes cross memory three times (read,
write, read again). On a CPU serving many sequences that traffic is most of the decode step,
so this kernel (``paged_attention_cpu.cpp``, same contract, float32) walks the block table and
reads every key and value row once, where it lies. It is compiled on first use with the
machine's own instruction set (``-O3 -march=native -fopenmp``, through
``torch.utils.cpp_extension``, which needs a C++ compiler and ninja) into torch's extension cache
(``TORCH_EXTENSIONS_DIR``), under a name that carries a hash of the CPU's feature flags, so
nodes of different CPUs sharing a home directory each build their own. Where it cannot be built
the dispatch point falls back to the reference (see :func:`available`).

``Q_TILE`` query tokens of a prefill chunk share one pass over their keys; decode tokens are one
per sequence.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sysconfig
from pathlib import Path

import torch

Q_TILE = 16
_SOURCE = Path(__file__).with_name("paged_attention_cpu.cpp")
log = logging.getLogger(__name__)


def _cpu_tag() -> str:
    """A short hash of this CPU's feature flags (what ``-march=native`` compiles for)."""
    flags = platform.processor() + platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


@functools.cache
def _module():
    from torch.utils import cpp_extension

    scripts = sysconfig.get_path("scripts")  # pip's ninja lands here, maybe not on PATH
    if scripts and scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    return cpp_extension.load(name=f"optgptq_paged_attention_cpu_{_cpu_tag()}",
                              sources=[str(_SOURCE)],
                              extra_cflags=["-O3", "-march=native", "-fopenmp"],
                              extra_ldflags=["-fopenmp"], verbose=False)


@functools.cache
def available() -> bool:
    """Whether the native kernel is built (building it on the first call); False, with one
    warning saying why, where it cannot be (no compiler or ninja, a failed build)."""
    try:
        _module()
    except Exception as err:  # any build failure means: use the reference
        log.warning("native CPU paged attention unavailable (%s: %s); using the PyTorch "
                    "reference", type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return False
    return True


def paged_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor,
                        query_start_loc: torch.Tensor, scale: float,
                        alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of every query token over its sequence's cached context; returns q's shape."""
    return _module().paged_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                     query_start_loc, scale, alibi_slopes, Q_TILE)
