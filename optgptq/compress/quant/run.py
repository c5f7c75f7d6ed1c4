"""The ``optgptq quantize`` run: an HF folder into a checkpoint folder, as the options ask.

:func:`quantize_folder` builds the method's settings from the command line's options
(:func:`spec_from_args`; the flags are defined in :mod:`optgptq.compress.cli`), draws the
calibration windows, quantizes (:func:`optgptq.compress.quant.pipeline.quantize_model`),
prints the held-out estimate (:mod:`optgptq.compress.eval`) and writes the checkpoint
(:func:`optgptq.compress.quant.checkpoint.save_checkpoint`). ``optgptq compress`` runs it on
the folder a GQA conversion wrote.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optgptq.compress.calib import calibration_windows
from optgptq.compress.eval import check_perplexity, estimate
from optgptq.compress.quant.checkpoint import save_checkpoint
from optgptq.compress.quant.dgq import DGQSpec
from optgptq.compress.quant.gptqt import GPTQTSpec
from optgptq.compress.quant.methods import METHODS
from optgptq.compress.quant.pipeline import (float32_matmul, folder_architecture,
                                             load_float_model, quantize_model)
from optgptq.compress.quant.quantizer import QuantSpec

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def calibration(model: Path, float_model: nn.Module, a: argparse.Namespace,
                progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The fitting and held-out check windows the options ask for (see calib.py), a model that
    writes its own calibration text running at ``--matmul-precision``."""
    with float32_matmul(a.matmul_precision):
        return calibration_windows(model, float_model, a, progress)


def quantize_folder(model: Path, out: Path, a: argparse.Namespace, overwrite: bool,
                    windows: tuple | None = None) -> dict:
    """Quantize the HF folder ``model`` into the checkpoint ``out``; a summary dict.
    ``windows``: the (fitting, check) token batches, if already drawn (else drawn here)."""
    start = time.perf_counter()
    spec = spec_from_args(a)
    folder_architecture(model)
    calibrated = METHODS[a.method].calibrated
    float_model = None
    if windows is None and (calibrated or a.check_samples):
        float_model = load_float_model(model)
        windows = calibration(model, float_model, a)
    fit, check = windows or (None, None)
    before = None
    if check is not None and check.numel():
        before = check_perplexity(float_model or load_float_model(model), check)
    del float_model
    qm = quantize_model(model, spec, a.method, fit if calibrated else None,
                        matmul_precision=a.matmul_precision)
    est = estimate(before, qm.model, check, a.warn_above, f"{a.method} {a.bits}-bit") \
        if before is not None else {}
    path = save_checkpoint(qm, model, out, DTYPES[a.dtype], overwrite)
    qc = spec.quantization_config(a.method) if isinstance(spec, QuantSpec) else {}
    refused = ([" desc_act with groups (act-order without --static-groups: vLLM >= 0.32)"]
               if qc.get("desc_act") and a.group_size != -1 else [])
    refused += [" asymmetric zeros (vLLM 0.32's CPU build; --sym)"] if qc and not qc["sym"] else []
    if refused:
        print(f"optgptq: note: transformers, gptqmodel and this engine load this checkpoint; "
              f"vLLM refuses{' and'.join(refused)}", file=sys.stderr)
    return {"out": str(path), "method": a.method, "bits": a.bits, "group_size": a.group_size,
            "seconds": round(time.perf_counter() - start, 2),
            "quantize_seconds": round(qm.seconds, 2), "modules": len(qm.results), **est}


def spec_from_args(a: argparse.Namespace) -> Any:
    """The settings of ``--method`` the options ask for; ``ValueError`` for options it cannot
    honour."""
    spec_type = METHODS[a.method].spec
    if spec_type is not GPTQTSpec and (a.intermediate_bits is not None or a.explore is not None):
        raise ValueError("--intermediate-bits and --explore apply to --method gptqt only")
    if spec_type is GPTQTSpec:
        return _gptqt_spec(a)
    if spec_type is DGQSpec:
        return _dgq_spec(a)
    return QuantSpec(bits=a.bits, group_size=a.group_size, sym=_pick(a.sym, QuantSpec.sym),
                     desc_act=_pick(a.act_order, QuantSpec.desc_act),
                     static_groups=a.static_groups, damp=a.damp,
                     mse=_pick(a.mse, QuantSpec.mse))


def _pick(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def _dgq_spec(a: argparse.Namespace) -> DGQSpec:
    if a.bits != 4:
        raise ValueError(f"--bits {a.bits}: dgq quantizes weights to 4 bits only")
    for flag, used in (("--act-order", a.act_order), ("--static-groups", a.static_groups),
                       ("--mse", a.mse)):
        if used:
            raise ValueError(f"{flag} is a GPTQ option; it does not apply to --method dgq")
    return DGQSpec(a.group_size, a.clip_percentile, a.fine_grid, a.fine_min_ratio,
                   a.coarse_grid, a.coarse_min_ratio)


def _gptqt_spec(a: argparse.Namespace) -> GPTQTSpec:
    if a.act_order or a.static_groups or a.mse:
        raise ValueError("--act-order, --static-groups and --mse are not supported with --method "
                         "gptqt (its groups are consecutive input columns, fitted as GPTQ reaches "
                         "them, by its own scale search)")
    explore = GPTQTSpec.explore
    if a.explore is not None:
        parts = a.explore.split(":")
        try:
            explore = (float(parts[0]), float(parts[1]), int(parts[2]))
        except (ValueError, IndexError):
            raise ValueError(f"--explore must be LO:HI:STEPS (e.g. 0.7:1.1:9), got "
                             f"{a.explore!r}") from None
        if len(parts) != 3:
            raise ValueError(f"--explore must be LO:HI:STEPS, got {a.explore!r}")
    return GPTQTSpec(bits=a.bits, intermediate_bits=a.intermediate_bits,
                     group_size=a.group_size, explore=explore, damp=a.damp)
