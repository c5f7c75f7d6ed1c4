"""Opt-GQA quality on SmolLM2-135M: perplexity after converting 3 -> 1 K/V heads, and recovery.

Calibrates on one text and evaluates perplexity on another (non-overlapping windows), for:

- the original model (9 query heads, 3 K/V heads);
- 3 -> 1 K/V heads, ``contiguous`` and ``similarity`` grouping, ``mean`` and ``lstsq`` merge.
  With one K/V head there is a single group of all 9 heads, so both groupings give the same
  model; the script checks that instead of converting twice;
- the original expanded to multi-head attention (each K/V head copied to its 3 query heads,
  query heads shuffled per layer, same function), converted back to 3 K/V heads with
  ``contiguous`` grouping (neighbouring heads, which after the shuffle are not the original
  groups) and with ``similarity`` grouping (which must find the original groups and recover
  the original logits).

``gqa_quality(...)`` returns the results dict; run as a script it writes
``bench/results/gqa-quality.json``::

    python bench/gqa_quality.py --calib ../shared/data/austen/emma.txt \\
        --eval ../shared/data/austen/prideprejudice.txt
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from optgptq.compress import gqa
from optgptq.compress.calib import load_calibration, load_texts, token_stream
from optgptq.models.hub import resolve_model


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, window: int) -> float:
    """Perplexity over non-overlapping ``window``-token windows of a 1-D token stream."""
    rows = tokens[: tokens.numel() // window * window].view(-1, window)
    total, count = 0.0, 0
    for row in rows:
        logits = model(row[None]).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
        count += row.numel() - 1
    return math.exp(total / count)


@torch.no_grad()
def max_logit_diff(a, b, tokens: torch.Tensor) -> float:
    return float((a(tokens[None]).logits - b(tokens[None]).logits).abs().max())


def gqa_quality(model: str = "smollm2", calib: str | None = None, eval_text: str | None = None,
                num_samples: int = 16, seq_len: int = 512, eval_tokens: int = 8192,
                window: int = 1024, seed: int = 0, log=print) -> dict:
    """The measurements described in the module docstring, as a results dict."""
    from transformers import AutoTokenizer

    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    ids = load_calibration(tokenizer, calib, num_samples, seq_len, seed)
    stream = token_stream(tokenizer, load_texts(eval_text))[:eval_tokens]
    original = gqa.load_model(path)
    h, kv = original.config.num_attention_heads, original.config.num_key_value_heads
    rows: dict[str, dict] = {}

    def record(name: str, model_, seconds: float, **extra) -> None:
        start = time.perf_counter()
        rows[name] = {"ppl": perplexity(model_, stream, window), "convert_s": round(seconds, 1),
                      "num_kv_heads": model_.config.num_key_value_heads, **extra}
        log(f"{name}: {rows[name]} (eval {time.perf_counter() - start:.0f}s)")

    record(f"original ({kv} kv heads)", original, 0.0)
    merged: dict[str, torch.nn.Module] = {}
    for merge in gqa.MERGES:
        converted = copy.deepcopy(original)
        start = time.perf_counter()
        result = gqa.convert_model(converted, 1, "contiguous", merge, ids, progress=False)
        record(f"gqa {kv}->1 contiguous/{merge}", converted, time.perf_counter() - start,
               calib_loss=result.calib_loss)
        merged[merge] = converted
    # One group of all heads: similarity grouping has nothing to choose.
    for merge in gqa.MERGES:
        rows[f"gqa {kv}->1 similarity/{merge}"] = dict(
            rows[f"gqa {kv}->1 contiguous/{merge}"],
            note=f"with 1 K/V head all {h} heads form one group, so similarity grouping equals "
                 f"contiguous grouping (same groups, same weights)")
    expanded = copy.deepcopy(original)
    gqa.expand_to_mha(expanded, shuffle_seed=seed)
    probe = stream[:window]
    rows["expanded mha (shuffled heads)"] = {
        "num_kv_heads": h, "max_abs_logit_diff_vs_original": max_logit_diff(expanded, original,
                                                                            probe)}
    for grouping in gqa.GROUPINGS:
        converted = copy.deepcopy(expanded)
        start = time.perf_counter()
        calib_ids = ids if grouping == "similarity" else None
        gqa.convert_model(converted, kv, grouping, "mean", calib_ids, progress=False)
        record(f"expanded mha -> {kv} {grouping}/mean", converted, time.perf_counter() - start,
               max_abs_logit_diff_vs_original=max_logit_diff(converted, original, probe))
    return {"model": str(path), "calib": calib, "eval": eval_text, "num_samples": num_samples,
            "seq_len": seq_len, "eval_tokens": int(stream.numel()), "window": window,
            "seed": seed, "rows": rows}


def targets(results: dict) -> list[dict]:
    """The issue's GQA targets as measured."""
    rows = results["rows"]
    kv = next(r["num_kv_heads"] for k, r in rows.items() if k.startswith("original"))
    sim, con = rows[f"expanded mha -> {kv} similarity/mean"], rows[f"expanded mha -> {kv} contiguous/mean"]
    orig = next(r for k, r in rows.items() if k.startswith("original"))
    # GQA kv -> 1 is one group of every head: the two groupings are the same partition, so it
    # is no test of grouping (its rows say so) and carries no target.
    return [
        {"name": f"similarity better than contiguous: ppl, expanded MHA -> {kv} (shuffled heads)",
         "value": sim["ppl"], "target": f"< contiguous {con['ppl']:.3f}", "better": "lower",
         "met": sim["ppl"] < con["ppl"]},
        {"name": f"recovery exact: max |logit diff|, expanded MHA -> {kv} similarity vs original",
         "value": sim["max_abs_logit_diff_vs_original"], "target": "<= 1e-3 (rounding)",
         "better": "lower", "met": sim["max_abs_logit_diff_vs_original"] <= 1e-3},
        {"name": "recovery exact: ppl equal to the original", "value": sim["ppl"],
         "target": f"{orig['ppl']:.4f} +- 0.01%", "better": "lower",
         "met": abs(sim["ppl"] - orig["ppl"]) <= 1e-4 * orig["ppl"]},
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--calib", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--out", default="bench/results/gqa-quality.json")
    a = p.parse_args()
    import transformers

    results = gqa_quality(a.model, a.calib, a.eval, a.num_samples, a.seq_len, a.eval_tokens,
                          a.window, log=lambda s: print(s, flush=True))
    doc = {"machine": f"{platform.processor() or platform.machine()}, "
                      f"{torch.get_num_threads()} threads, CPU float32",
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__},
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python " + " ".join(sys.argv), "results": results,
           "targets": targets(results)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["targets"], indent=2))


if __name__ == "__main__":
    main()
