"""The ``optgptq convert`` run: Opt-GQA conversion of an HF folder into a new HF folder.

Examples::

    optgptq convert --model smollm2 --out smollm2-gqa1 --num-kv-heads 1 \\
        --grouping similarity --merge lstsq --calib notes.txt
    optgptq convert --model M --out DIR --num-kv-heads auto \\
        --target-batch 64 --target-context 4096 --accelerator-memory 8e9

The model is grouped and merged (:mod:`optgptq.compress.gqa.convert`; with ``--num-kv-heads
auto``, the count chosen by :mod:`optgptq.compress.gqa.auto`), then recovery
(:mod:`optgptq.compress.gqa.recover`, on by default for Llama-family models:
``--recover-seconds 0`` turns it off) distils the original model into the converted one on the
calibration windows. Before and after, the perplexity on held-out calibration windows is
printed, with a warning past ``--warn-above`` (:mod:`optgptq.compress.eval`). The flags are
defined in :mod:`optgptq.compress.cli`.
"""

from __future__ import annotations

import argparse
import copy
import sys

from optgptq.compress.calib import calibration_windows
from optgptq.compress.eval import check_perplexity, estimate
from optgptq.compress.gqa import arch, auto, recover
from optgptq.compress.gqa.convert import convert_model, load_model, save_folder
from optgptq.compress.gqa.grouping import check_group_count
from optgptq.models.hub import resolve_model


def run_convert(a: argparse.Namespace) -> int:
    """Convert ``--model`` into ``--out`` as the options ask (module docstring); exit code 0."""
    choosing = a.num_kv_heads == "auto"
    if not choosing:
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
    model = load_model(path)
    h, kv = arch.num_heads(model.config), arch.num_kv_heads(model.config)
    if not choosing:
        check_group_count(h, kv, target)
    recovering = ((a.recover_seconds > 0 or bool(a.recover_steps))
                  and arch.is_llama(model.config))
    needs_calib = (choosing or recovering or a.check_samples > 0
                   or (a.grouping, a.merge) != ("contiguous", "mean"))
    calib, check = (calibration_windows(path, model, a, progress=not a.quiet) if needs_calib
                    else (None, None))
    before = check_perplexity(model, check) if check is not None else None
    teacher = copy.deepcopy(model) if recovering else None
    if choosing:
        budget = auto.token_budget(model, a.kv_budget, a.target_batch, a.target_context,
                                   a.accelerator_memory, a.kv_dtype)
        options, chosen, model, result = auto.choose_num_kv_heads(
            model, calib, budget, a.grouping, a.merge, a.kv_dtype, progress=not a.quiet)
        print(auto.format_table(options, chosen, budget))
    else:
        result = convert_model(model, target, a.grouping, a.merge, calib,
                               progress=not a.quiet)
    done = f"{a.grouping}/{a.merge}"
    if recovering:
        if before is not None:
            print(f"before recovery: held-out perplexity estimate "
                  f"{check_perplexity(model, check):.3f}", file=sys.stderr)
        rec = recover.recover(model, teacher, calib, a.recover_seconds, a.recover_steps,
                              a.recover_train, a.recover_lr, device=a.device, seed=a.seed,
                              progress=not a.quiet)
        done += f" + recovery ({a.recover_train}, {rec.steps} steps, {rec.seconds:.0f} s)"
        del teacher
    if check is not None:
        estimate(before, model, check, a.warn_above, "the GQA conversion")
    out = save_folder(model, path, a.out)
    loss = f", calibration loss {result.calib_loss:.4f} nats" if result.calib_loss else ""
    print(f"wrote {out} ({h} heads, {kv} -> {result.num_kv_heads} K/V heads, {done}{loss})")
    if a.grouping == "similarity" and not a.quiet:
        for i, groups in enumerate(result.groups):
            print(f"  layer {i}: groups {groups}", file=sys.stderr)
    return 0
