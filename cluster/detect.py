"""Accelerators of this node: CUDA GPUs, ROCm GPUs, Hygon DCUs or none, and how Ray should see them.

Two steps, so that the logic is tested on faked device lists:

1. :func:`probe` gathers facts: torch's device count, ``torch.version.hip`` and device names (a
   DTK build of torch is a HIP build whose ``torch.cuda`` drives the DCUs), the GPU agents the
   ROCm kernel driver lists under ``/sys/class/kfd/kfd/topology/nodes`` (their PCI vendor: AMD
   0x1002, Hygon 0x1d94), the NVIDIA driver's ``/proc/driver/nvidia/gpus``, and the device-mask
   variables (``CUDA_VISIBLE_DEVICES``, ``HIP_VISIBLE_DEVICES``, ``ROCR_VISIBLE_DEVICES``).
2. :func:`classify` turns facts into :class:`Accelerators` (kind and count). torch's count wins
   (it applies the masks itself); without torch, the driver listings are counted under the
   masks (ROCR first, then HIP or else CUDA, as the HIP runtime does).

Ray counts GPUs with NVML or ROCm SMI; on DCU nodes ROCm SMI may find none, so the node launcher
passes the count from here as ``ray start --num-gpus``. Ray then gives each GPU actor one device by
setting a mask variable, and which one depends on what Ray detected: ``HIP_VISIBLE_DEVICES``
when ROCm SMI saw AMD devices, otherwise ``CUDA_VISIBLE_DEVICES`` (which the HIP runtime honours
only while ``HIP_VISIBLE_DEVICES`` is unset). :func:`ray_env` rewrites the node's masks so that
Ray's per-actor mask is the one that takes effect.

``python -m cluster.detect`` prints the node's result as JSON.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Mapping

Kind = Literal["cuda", "rocm", "dcu", "cpu"]
AMD_VENDOR = 0x1002
HYGON_VENDOR = 0x1d94
MASKS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


@dataclass(frozen=True)
class Probe:
    """Facts about one node's devices (all optional: a field left at its default is unknown)."""

    torch_count: int | None = None
    """``torch.cuda.device_count()``; None where torch is missing or failed."""
    torch_hip: str | None = None
    """``torch.version.hip``: set by ROCm and DTK builds of torch."""
    torch_names: tuple[str, ...] = ()
    kfd_vendors: tuple[int, ...] = ()
    """PCI vendor ids of the GPU agents in the KFD topology (before any mask)."""
    nvidia_count: int = 0
    """Entries of /proc/driver/nvidia/gpus (before any mask)."""
    env: Mapping[str, str] = field(default_factory=dict)
    """The mask variables and ROCM_PATH (a DTK install path names ``dtk``)."""


@dataclass(frozen=True)
class Accelerators:
    kind: Kind
    count: int
    source: str
    """Where the count came from: ``torch``, ``kfd``, ``nvidia`` or ``none``."""


def mask_ids(value: str | None) -> list[str] | None:
    """The device ids a mask variable lists (None: unset, all visible)."""
    if value is None:
        return None
    value = value.strip()
    if value in ("", "NoDevFiles"):
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def _masked(count: int, *masks: str | None) -> int:
    for mask in masks:
        ids = mask_ids(mask)
        if ids is not None:
            count = min(count, len(ids))
    return count


def _is_hygon(p: Probe) -> bool:
    if HYGON_VENDOR in p.kfd_vendors:
        return True
    if any(re.search(r"\bDCU\b|hygon", name, re.IGNORECASE) for name in p.torch_names):
        return True
    return "dtk" in p.env.get("ROCM_PATH", "").lower()


def classify(p: Probe) -> Accelerators:
    """Kind and count of the accelerators that ``p`` describes."""
    env = p.env
    if p.torch_count:
        if p.torch_hip:
            return Accelerators("dcu" if _is_hygon(p) else "rocm", p.torch_count, "torch")
        return Accelerators("cuda", p.torch_count, "torch")
    hip = env.get("HIP_VISIBLE_DEVICES", env.get("CUDA_VISIBLE_DEVICES"))
    kfd = _masked(len(p.kfd_vendors), env.get("ROCR_VISIBLE_DEVICES"), hip)
    if kfd:
        return Accelerators("dcu" if _is_hygon(p) else "rocm", kfd, "kfd")
    nvidia = _masked(p.nvidia_count, env.get("CUDA_VISIBLE_DEVICES"))
    if nvidia:
        return Accelerators("cuda", nvidia, "nvidia")
    return Accelerators("cpu", 0, "none")


def ray_env(acc: Accelerators, env: Mapping[str, str], ray_sees_amd: bool) -> dict[str, str | None]:
    """Mask variables to set (a string) or unset (None) before ``ray start`` on this node.

    ``ray_sees_amd``: Ray's own AMD detection (ROCm SMI) finds devices here, so Ray masks with
    ``HIP_VISIBLE_DEVICES``; otherwise Ray masks with ``CUDA_VISIBLE_DEVICES``. CUDA nodes and
    CPU nodes need no change.
    """
    if acc.kind not in ("rocm", "dcu"):
        return {}
    hip, cuda, rocr = (env.get(k) for k in ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES",
                                            "ROCR_VISIBLE_DEVICES"))
    if ray_sees_amd:
        if hip is not None:
            return {}
        if cuda is not None:
            return {"HIP_VISIBLE_DEVICES": cuda, "CUDA_VISIBLE_DEVICES": None}
        if rocr is not None:  # Ray refuses ROCR_VISIBLE_DEVICES alone; HIP ids index into it
            return {"HIP_VISIBLE_DEVICES": ",".join(str(i) for i in range(acc.count))}
        return {}
    visible = hip if hip is not None else cuda
    out: dict[str, str | None] = {"HIP_VISIBLE_DEVICES": None}
    if visible is not None:
        out["CUDA_VISIBLE_DEVICES"] = visible
    return out


def _torch_facts() -> tuple[int | None, str | None, tuple[str, ...]]:
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        names = tuple(torch.cuda.get_device_name(i) for i in range(count))
        return count, getattr(torch.version, "hip", None), names
    except Exception:  # no torch, or a broken driver stack: fall back to the driver listings
        return None, None, ()


def _kfd_vendors(root: Path) -> tuple[int, ...]:
    vendors = []
    for props in sorted(root.glob("nodes/*/properties")):
        fields = dict(line.split(None, 1) for line in props.read_text().splitlines()
                      if len(line.split(None, 1)) == 2)
        if int(fields.get("simd_count", "0")) > 0:  # a GPU agent (CPU agents have no SIMDs)
            vendors.append(int(fields.get("vendor_id", "0")))
    return tuple(vendors)


def probe(env: Mapping[str, str] | None = None, use_torch: bool = True,
          kfd_root: Path = Path("/sys/class/kfd/kfd/topology"),
          nvidia_root: Path = Path("/proc/driver/nvidia/gpus")) -> Probe:
    """Gather this node's facts (torch is imported only when ``use_torch``)."""
    env = os.environ if env is None else env
    count, hip, names = _torch_facts() if use_torch else (None, None, ())
    try:
        kfd = _kfd_vendors(kfd_root) if kfd_root.is_dir() else ()
    except (OSError, ValueError):
        kfd = ()
    nvidia = len(list(nvidia_root.iterdir())) if nvidia_root.is_dir() else 0
    keep = {k: env[k] for k in (*MASKS, "ROCM_PATH") if k in env}
    return Probe(count, hip, names, kfd, nvidia, keep)


def ray_sees_amd() -> bool:
    """Whether Ray's AMD detection (ROCm SMI) finds devices on this node (False without Ray)."""
    try:
        from ray._private.accelerators import AMDGPUAcceleratorManager

        return AMDGPUAcceleratorManager.get_current_node_num_accelerators() > 0
    except Exception:
        return False


def main() -> None:
    facts = probe()
    acc = classify(facts)
    print(json.dumps({**asdict(acc), "ray_env": ray_env(acc, facts.env, ray_sees_amd())}))


if __name__ == "__main__":
    main()
