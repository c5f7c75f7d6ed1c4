"""GPTQ 4-bit linear for float16 activations on NVIDIA tensor cores (sm_80+), in CUDA C++.

``out = x @ W (+ bias)`` with ``W`` in the GPTQ format of :mod:`optgptq_kernels.gptq`, through
a Marlin-class mixed-input GEMM (``gptq_cuda.cuh``, bound as ``torch.ops.optgptq_cuda`` by
``gptq_cuda.cu`` and built here at first use). Same contract as ``gptq_linear_ref``.

Load time, :func:`prepare` (PyTorch, once per weight) repacks into a :class:`PreparedGPTQ`:

- act-order: rows are reordered by a stable argsort of ``g_idx`` so that groups become
  contiguous (``perm``; ``x``'s columns are permuted to match with ``index_select`` per call).
  Accepted only where the sorted ``g_idx`` is ``arange(K) // group_size``.
- ``tiles`` int32 ``[K/64 * N/16 * 32, 4]``: the codes cut into 16x16 tiles, each lane's 8 codes
  of a tile in one word, in the mma.m16n8k16 B-fragment order (lane ``l``, ``g = l // 4``,
  ``t = l % 4``; nibble ``i`` of the word at :data:`LANE_ROWS`/:data:`LANE_COLS` ``[l, i]``:
  rows ``2t, 2t+8, 2t, 2t+8, 2t+1, 2t+9, 2t+1, 2t+9`` and columns ``g, g, g+8, g+8`` twice),
  words ordered ``[K/64 slice][N/16 tile][lane][4 k16 tiles of the slice]``: one 16-byte load per
  lane per tile and slice, a block's columns of one slice contiguous.
- ``scales`` float16 ``[groups, N]`` and ``zeros`` float16 ``1024 + z`` (None when every zero
  point is 8: symmetric), columns interleaved within each 16 (column ``g`` at ``2g``, ``g + 8`` at
  ``2g + 1``), so a lane reads both its columns in one 32-bit load.

The kernel (algorithm in ``gptq_cuda.cuh``) dequantizes with float16 bit tricks that are exact
up to one rounding: ``(1024 + q) - (1024 + z)`` and ``(1024 + 16 q) / 16 - (64 + z)`` are exact
``q - z``, and one float16 multiply by the scale rounds ``s (q - z)`` once, as
``dequantize_ref`` rounds its float32 product: the dequantized weights are bit-identical to
``dequantize_ref(..., torch.float16)``. Products accumulate in float32 (mma.sync); the bias is
added in float32 before the one rounding to float16. Small ``M`` splits ``K`` over ``grid.z``
(:func:`split_for`), summed by the last block of each tile in a fixed order (deterministic).

:func:`emulate` recomputes the product from the repacked tensors with the kernel's lane/nibble
mapping, in PyTorch (CPU tests prove the repack with it); :func:`gptq_linear_cuda` runs the
kernel (CUDA-graph safe: no host syncs, counters allocated before capture). Configs (template
instances, :data:`CONFIGS`, mirrored in ``gptq_cuda.cuh``) are picked per ``M`` by
:func:`config_for`; both choices can be overridden per call for tuning.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from optgptq_kernels.gptq import unpack_cols

log = logging.getLogger(__name__)
_HERE = Path(__file__).parent
_SOURCES = (_HERE / "gptq_cuda.cu", _HERE / "gptq_cuda.cuh")


class Config(NamedTuple):
    warps_m: int
    warps_n: int
    m_tiles: int
    n_tiles: int
    stages: int
    blocks_per_sm: int  # split-K aims at this many blocks per SM

    @property
    def bm(self) -> int:
        return self.warps_m * 16 * self.m_tiles

    @property
    def bn(self) -> int:
        return self.warps_n * 16 * self.n_tiles


# Must match OPTGPTQ_CUDA_CONFIGS in gptq_cuda.cuh (tests/test_gptq_cuda.py compares them).
CONFIGS = (Config(1, 4, 1, 2, 8, 2), Config(1, 4, 2, 2, 6, 2), Config(1, 4, 4, 2, 4, 1),
           Config(2, 4, 4, 2, 4, 1))
MAX_SPLIT = 16
_lane = torch.arange(32)
LANE_ROWS = torch.stack([2 * (_lane % 4) + d for d in (0, 8, 0, 8, 1, 9, 1, 9)], 1)
LANE_COLS = torch.stack([_lane // 4 + d for d in (0, 0, 8, 8, 0, 0, 8, 8)], 1)
_TILE_INDEX = (LANE_ROWS * 16 + LANE_COLS).reshape(-1)  # (lane, nibble) -> row * 16 + col


@dataclass
class PreparedGPTQ:
    tiles: torch.Tensor          # int32 [K/64 * N/16 * 32, 4]
    scales: torch.Tensor         # float16 [groups, N], interleaved
    zeros: torch.Tensor | None   # float16 [groups, N] 1024 + z, interleaved; None: symmetric
    perm: torch.Tensor | None    # int32 [K] act-order row order, None: rows in order
    group_size: int
    k: int
    n: int


def _interleave(t: torch.Tensor) -> torch.Tensor:
    """Columns ``g`` and ``g + 8`` of each 16 side by side: ``16c + 8h + g -> 16c + 2g + h``."""
    return t.reshape(t.shape[0], -1, 2, 8).transpose(2, 3).reshape(t.shape).contiguous()


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1, 8, 2).transpose(2, 3).reshape(t.shape).contiguous()


def prepare(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
            g_idx: torch.Tensor, bits: int) -> PreparedGPTQ | None:
    """The kernel's layout of a GPTQ weight, or None where the kernel does not apply (it needs 4
    bits, float16 scales, K and N multiples of 64, a group size of 16, 32 or a multiple of 64 and,
    with act-order, groups of that size): the caller then takes another path."""
    k, n = g_idx.shape[0], scales.shape[1]
    if bits != 4 or k % 64 or n % 64 or scales.dtype != torch.float16 or k == 0 or n == 0:
        return None
    groups = g_idx.long()
    if int(groups.min()) < 0 or int(groups.max()) >= scales.shape[0]:
        return None
    size = int(torch.bincount(groups).max())  # the group size (a last group may be shorter)
    if size not in (16, 32) and size % 64:
        return None
    order = torch.arange(k, device=g_idx.device) // size
    perm = None
    if not torch.equal(groups, order):
        perm = torch.argsort(groups, stable=True)
        if not torch.equal(groups[perm], order):
            return None
    shifts = torch.arange(8, device=qweight.device, dtype=torch.int64) * 4
    index = _TILE_INDEX.to(qweight.device)
    chunks = []
    for start in range(0, k, 1024):  # bounded temporaries at large N
        end = min(start + 1024, k)
        rows = torch.arange(start, end, device=qweight.device) if perm is None else perm[start:end]
        q = (qweight[rows // 8].long() >> (4 * (rows % 8)).unsqueeze(1)) & 15   # [rows, N]
        slices = q.shape[0] // 64
        tile = q.view(slices, 4, 16, n // 16, 16).permute(0, 3, 1, 2, 4)  # [.., nt, kk, r, c]
        tile = tile.reshape(slices, n // 16, 4, 256)
        codes = tile[..., index].view(slices, n // 16, 4, 32, 8)
        words = (codes << shifts).sum(-1).transpose(2, 3)                        # [.., lane, kk]
        chunks.append(torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32))
    tiles = torch.cat(chunks).reshape(-1, 4).contiguous()
    z = unpack_cols(qzeros, 4, n)[: scales.shape[0]] + 1
    zeros = None if bool((z == 8).all()) else _interleave((z + 1024).to(torch.float16))
    return PreparedGPTQ(tiles, _interleave(scales), zeros,
                        None if perm is None else perm.to(torch.int32), size, k, n)


def emulate_weight(prepared: PreparedGPTQ, original_order: bool = True) -> torch.Tensor:
    """The float16 ``[K, N]`` weight the kernel dequantizes, read back from the repacked tensors
    lane by lane and nibble by nibble (rows in ``g_idx``'s order unless ``original_order`` is
    False: then in the kernel's permuted order)."""
    k, n, p = prepared.k, prepared.n, prepared
    words = p.tiles.long().view(k // 64, n // 16, 32, 4) & 0xFFFFFFFF       # [kb, nt, lane, kk]
    shifts = torch.arange(8, device=words.device) * 4
    codes = (words.unsqueeze(-1) >> shifts) & 15                           # [.., lane, kk, nibble]
    tile = torch.empty(k // 64, n // 16, 4, 256, dtype=torch.int64, device=words.device)
    codes = codes.transpose(2, 3).reshape(k // 64, n // 16, 4, 256)
    tile[..., _TILE_INDEX.to(words.device)] = codes
    q = tile.view(k // 64, n // 16, 4, 16, 16).permute(0, 2, 3, 1, 4).reshape(k, n)
    group = torch.arange(k, device=q.device) // p.group_size
    scales = _deinterleave(p.scales).float()[group]
    z = 8 if p.zeros is None else _deinterleave(p.zeros).float()[group] - 1024
    w = (scales * (q.float() - z)).to(torch.float16)
    if p.perm is None or not original_order:
        return w
    out = torch.empty_like(w)
    out[p.perm.long()] = w
    return out


def emulate(x: torch.Tensor, prepared: PreparedGPTQ,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the kernel computes, in PyTorch: ``x`` permuted to the kernel's row order, products
    of the float16 weights summed in float32, the bias added in float32, one rounding to
    ``x``'s dtype."""
    w = emulate_weight(prepared, original_order=False)
    if prepared.perm is not None:
        x = x.index_select(-1, prepared.perm.to(x.device))
    out = x.float() @ w.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _build(major: int, minor: int) -> None:
    from torch.utils import cpp_extension

    scripts = sysconfig.get_path("scripts")  # pip's ninja lands here, maybe not on PATH
    if scripts and scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    arch = f"{major}{minor}"
    tag = hashlib.sha1(b"".join(s.read_bytes() for s in _SOURCES) + arch.encode()).hexdigest()[:10]
    cpp_extension.load(name=f"optgptq_cuda_{tag}", sources=[str(_SOURCES[0])],
                       extra_cflags=["-O3"], extra_include_paths=[str(_HERE)],
                       extra_cuda_cflags=["-O3", "-lineinfo",
                                          f"-gencode=arch=compute_{arch},code=sm_{arch}"],
                       is_python_module=False, verbose=False)


@functools.cache
def _built(capability: tuple[int, int]) -> bool:
    try:
        _build(*capability)
    except Exception as err:  # any build failure means: use another path
        log.warning("CUDA GPTQ kernel unavailable (%s: %s)", type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "")
        return False
    return True


def available(device: torch.device | str | None = None) -> bool:
    """Whether the kernel runs on ``device`` (an NVIDIA GPU of compute capability 8.0 or newer
    where the extension builds; the first call builds it, about a minute)."""
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        return False
    capability = torch.cuda.get_device_capability(device)
    return capability >= (8, 0) and _built(capability)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def config_for(m: int) -> int:
    """The config (index into :data:`CONFIGS`) for ``m`` rows: the smallest tile that holds them,
    up to 64; 128 x 128 tiles beyond."""
    return 0 if m <= 16 else 1 if m <= 32 else 2 if m <= 64 else 3


def split_for(m: int, n: int, k: int, config: int, sms: int) -> int:
    """Split-K factor: enough blocks for ``blocks_per_sm`` per SM, at most K/64 and MAX_SPLIT."""
    c = CONFIGS[config]
    blocks = -(-m // c.bm) * -(-n // c.bn)
    return max(1, min(sms * c.blocks_per_sm // blocks, k // 64, MAX_SPLIT))


_LOCKS: dict[torch.device, list[torch.Tensor]] = {}


def _locks(device: torch.device, tiles: int) -> torch.Tensor:
    """Per-tile split-K arrival counters, zero between calls (the last block resets its own);
    grown outside graph capture by the first call of a shape, outgrown buffers kept alive for
    graphs that captured them. Calls must run in one stream order."""
    buffers = _LOCKS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < tiles:
        buffers.append(torch.zeros(max(tiles, 1 << 16), dtype=torch.int32, device=device))
    return buffers[-1]


def gptq_linear_cuda(x: torch.Tensor, prepared: PreparedGPTQ, bias: torch.Tensor | None = None,
                     config: int | None = None, split_k: int | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ W + bias`` in float16 on the GPU (see :func:`available`); ``config`` and
    ``split_k`` override :func:`config_for` and :func:`split_for`."""
    if x.dtype != torch.float16:
        raise TypeError(f"gptq_linear_cuda takes float16 activations, got {x.dtype}")
    lead, k, n = x.shape[:-1], prepared.k, prepared.n
    x2 = x.reshape(-1, k)
    if prepared.perm is not None:
        x2 = x2.index_select(1, prepared.perm)
    elif not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.clone(memory_format=torch.contiguous_format)
    m = x2.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=torch.float16, device=x.device)
    if m == 0:
        return out.view(*lead, n)
    config = config_for(m) if config is None else config
    c = CONFIGS[config]
    split = split_for(m, n, k, config, _sm_count(x.device)) if split_k is None else split_k
    if split > 1:
        workspace = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        locks = _locks(x.device, -(-m // c.bm) * -(-n // c.bn))
    else:
        workspace = torch.empty(0, dtype=torch.float32, device=x.device)
        locks = torch.empty(0, dtype=torch.int32, device=x.device)
    if bias is not None:
        bias = bias.to(torch.float16).contiguous()
    torch.ops.optgptq_cuda.gptq_gemm(x2, prepared.tiles, prepared.scales, prepared.zeros, bias,
                                     out, workspace, locks, prepared.group_size, config, split)
    return out.view(*lead, n)
