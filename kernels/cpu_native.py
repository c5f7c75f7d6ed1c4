"""The native CPU kernels: one C++ extension, built on first use for this machine's CPU.

Sources (beside this file), each registering its operators under ``torch.ops.optgptq_cpu``:

- ``paged_attention_cpu.cpp``: ``paged_decode_attention``, the decode rows of paged attention
  read from the cache's blocks in place (see :mod:`optgptq_kernels.paged_attention_cpu`);
- ``prefill_attention_cpu.cpp``: ``paged_prefill_attention``, the rows of sequences adding
  several tokens (AVX-512 builds);
- ``pointwise_cpu.cpp``: a decoder layer's pointwise steps, one pass each (``add_rms_norm``,
  ``rotary``, ``silu_and_mul``) and the KV cache write (``write_kv``), float32;
- ``linear_cpu.cpp``: float32 products from panel-packed weights (``pack_linear_weight``,
  ``packed_linear``; see :mod:`optgptq.models.cpu_linear`);
- ``gptq_cpu.cpp``: ``gptq_packed_linear``, float32 products from GPTQ weights repacked at load
  (2/3/4/8 bits, dequantized in registers; see :mod:`optgptq_kernels.gptq_cpu`);
- ``memory_cpu.cpp``: ``advise_huge_pages``, transparent huge pages for the KV pool.

On a CPU each of these steps, run as separate torch ops, is several passes over the step's
activations with a dispatch each (casts, powers, means, slices, concatenations): for a
135M-parameter model they took about 15% of a serving step. The PyTorch references in
:mod:`optgptq_kernels.pointwise` and :mod:`optgptq_kernels.kv_write` are the contract; rotary
and the KV write are bit-exact with them (``-ffp-contract=off`` keeps every product and sum
rounded as torch rounds them), the norm's sum of squares and SiLU's exponential differ from
torch's by a few units in the last place (another summation order, another ``exp``).

The extension is compiled with the machine's own instruction set (``-O3 -march=native
-fopenmp``, through ``torch.utils.cpp_extension``, which needs a C++ compiler and ninja) into
torch's extension cache (``TORCH_EXTENSIONS_DIR``), under a name that carries a hash of the
CPU's feature flags, so nodes of different CPUs sharing a home directory each build their own.
Where it cannot be built the dispatch point runs the references (see :func:`available`).
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

_SOURCES = [Path(__file__).with_name(name)
            for name in ("paged_attention_cpu.cpp", "pointwise_cpu.cpp",
                         "prefill_attention_cpu.cpp", "linear_cpu.cpp", "gptq_cpu.cpp",
                         "memory_cpu.cpp")]
_HEADERS = [Path(__file__).with_name(name)
            for name in ("simd_cpu.h", "paged_batch_cpu.h", "int8_rows_cpu.h")]
log = logging.getLogger(__name__)


def _cpu_tag() -> str:
    """A short hash of this CPU's feature flags (what ``-march=native`` compiles for) and of the
    shared headers (torch rebuilds on a change of the sources, not of what they include)."""
    flags = platform.processor() + platform.machine() + "".join(h.read_text() for h in _HEADERS)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


@functools.cache
def _build() -> None:
    from torch.utils import cpp_extension

    scripts = sysconfig.get_path("scripts")  # pip's ninja lands here, maybe not on PATH
    if scripts and scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    cpp_extension.load(name=f"optgptq_cpu_{_cpu_tag()}", sources=[str(s) for s in _SOURCES],
                       extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
                       extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)


@functools.cache
def available() -> bool:
    """Whether the extension is built and loaded (building it on the first call); False, with
    one warning saying why, where it cannot be (no compiler or ninja, a failed build)."""
    try:
        _build()
    except Exception as err:  # any build failure means: use the references
        log.warning("native CPU kernels unavailable (%s: %s); using the PyTorch references",
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return False
    return True


def ops():
    """The extension's operators (``torch.ops.optgptq_cpu``); call :func:`available` first."""
    return torch.ops.optgptq_cpu
