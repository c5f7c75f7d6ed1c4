"""What every benchmark's results file carries and how it is written.

A results file holds ``machine``, ``versions``, ``date``, ``command``, ``commit``, free-form
``results`` and ``targets`` (rows ``{"name", "value", "target", "better", "met"}``). The GPU
kernel benchmarks share one file per GPU (``kernels-<gpu>.json``): each merges its own section
and its targets into it and keeps the rest. Files are written to a temporary name and renamed,
so a crash never leaves half a file.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch


def commit() -> str | None:
    """``OPTGPTQ_COMMIT`` (set where the tree travels without .git, e.g. the GPU machine), else
    ``git rev-parse --short HEAD``."""
    sha = os.environ.get("OPTGPTQ_COMMIT")
    if sha is None:
        try:
            sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip() or None
        except OSError:
            sha = None
    return sha


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command() -> str:
    return "python " + shlex.join(sys.argv)


def cpu_machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs), CPU float32"


def gpu_short_name() -> str:
    """``h200``, ``h100`` or the device name in lower case with dashes."""
    name = torch.cuda.get_device_name().lower()
    return next((s for s in ("h200", "h100") if s in name), name.replace(" ", "-"))


def gpu_header() -> dict:
    """``machine``, ``versions``, ``date``, ``command`` and ``commit`` of a GPU run (``machine``
    names no GPU when none is present: an interpreter check of the script)."""
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        "none (CPU, Triton interpreter)"
    return {"machine": {"gpu": gpu, "platform": platform.platform(), "cores": os.cpu_count()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "triton": triton.__version__, "cuda": torch.version.cuda},
            "date": now(), "command": command(), "commit": commit()}


def target(name: str, value: float, goal: float, better: str = "higher") -> dict:
    met = value >= goal if better == "higher" else value <= goal
    return {"name": name, "value": round(value, 4), "target": goal, "better": better,
            "met": bool(met)}


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.rename(path)


def merge_section(path: Path, key: str, section: dict) -> None:
    """Put ``section`` under ``key`` of the JSON file ``path`` and its targets into the file's
    ``targets`` (replacing earlier rows of the same name), keeping everything else."""
    doc = json.loads(path.read_text()) if path.is_file() else {
        k: section[k] for k in ("machine", "versions", "date", "command") if k in section}
    mine = {t["name"] for t in section["targets"]}
    doc["targets"] = [t for t in doc.get("targets", []) if t["name"] not in mine] + \
        section["targets"]
    doc[key] = section
    write_atomic(path, json.dumps(doc, indent=2) + "\n")


def print_targets(targets: list[dict]) -> None:
    for t in targets:
        print(f"{'MET ' if t['met'] else 'MISS'} {t['name']}: {t['value']} (target {t['target']})")


def notes_and_targets_md(doc: dict) -> list[str]:
    """A result document's notes and targets as Markdown lines (a report's last sections)."""
    lines = ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    lines += ["", "## Targets", "", "| target | value | goal | met |", "|---|---:|---:|---|"]
    lines += [f"| {t['name']} | {t['value']} | {t['target']} ({t['better']}) | "
              f"{'yes' if t['met'] else 'NO'} |" for t in doc["targets"]]
    return lines
