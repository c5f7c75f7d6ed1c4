"""Paged attention on the CPU: decode tokens through a native kernel that reads the cache's
blocks in place, prefill chunks through the reference's matrix products.

The PyTorch reference (:mod:`optgptq_kernels.paged_attention`) gathers each sequence's blocks
into a contiguous copy and runs SDPA over it: the KV bytes cross memory three times (read,
write, read again). A decode token does two flops per KV byte, so on a CPU serving many
sequences that traffic is most of the decode step. The native kernel
(``paged_attention_cpu.cpp``, float32) walks the block table instead and reads every key and
value row of a decoding sequence once, where it lies, for the whole GQA group. A prefill chunk
does many flops per KV byte: there SDPA's matrix products win (on 512-1000-token chunks here the
reference ran 2.4-3.6x faster than per-row dot products), so those sequences go to the
reference, batched on their own.

The kernel is compiled on first use with the machine's own instruction set (``-O3
-march=native -fopenmp``, through ``torch.utils.cpp_extension``, which needs a C++ compiler and
ninja) into torch's extension cache (``TORCH_EXTENSIONS_DIR``), under a name that carries a hash
of the CPU's feature flags, so nodes of different CPUs sharing a home directory each build their
own. Where it cannot be built the dispatch point falls back to the reference (see
:func:`available`).
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
import torch.nn.functional as F

from optgptq_kernels.paged_attention import paged_attention_ref

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
    out = _module().paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                           query_start_loc, scale, alibi_slopes)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    chunks = torch.nonzero(q_lens > 1)[:, 0]
    if chunks.numel():
        lens = q_lens[chunks]
        rows = torch.cat([torch.arange(s, s + n) for s, n in
                          zip(query_start_loc[chunks].tolist(), lens.tolist())])
        out[rows] = paged_attention_ref(q[rows], k_cache, v_cache, block_tables[chunks],
                                        seq_lens[chunks], F.pad(lens.cumsum(0), (1, 0)).int(),
                                        scale, alibi_slopes)
    return out
