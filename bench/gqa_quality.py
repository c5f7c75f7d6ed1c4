"""Opt-GQA quality on SmolLM2-135M: grouping x merge x recovery, on held-out text.

Two conversions, each scored by perplexity on held-out windows (``quant_defaults.heldout``:
``--eval-windows`` windows of ``--window`` tokens spread over the files of ``--eval``), with
calibration drawn as ``optgptq convert`` draws it (``--calib``, default ``generated``):

- SmolLM2 itself, 3 -> 1 K/V heads: one group of all 9 query heads, so grouping has nothing to
  choose; ``mean`` and ``lstsq`` merges, each without recovery and with recovery training the
  K/V projections (``kv``) or the query, K/V and output projections (``qkvo``);
- an MHA model built from SmolLM2: each K/V head copied to its 3 query heads (query heads
  shuffled per layer, ``gqa.expand_to_mha``), then every copy's K/V weights perturbed by
  Gaussian noise of ``--perturb`` times the layer's weight standard deviation, so the copies
  are no longer equal and the grouping must find which heads belong together. This perturbed
  MHA model is the reference (teacher) of its rows: 9 -> 3 K/V heads with ``contiguous`` and
  ``similarity`` grouping x ``mean`` and ``lstsq`` merges, and recovery on two of them.

Recovery runs ``--recover-steps`` steps (the same number for every row), on the GPU when one
is present. ``--cpu-probe-steps`` first times that many recovery steps on the CPU with two
threads; without ``--recover-steps``, every row runs the steps two threads make in
``--recover-seconds`` (the default budget of ``optgptq convert``). Writes
``bench/results/gqa-quality.json`` and ``.md``::

    python bench/gqa_quality.py --eval ../shared/data/austen --recover-steps 200
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from optgptq.compress.calib import load_calibration_split
from optgptq.compress.eval import perplexity
from optgptq.compress.gqa import arch as gqa_arch, convert as gqa, recover as gqa_recover
from optgptq.models.hub import resolve_model

sys.path.insert(0, str(Path(__file__).parent))
import report  # noqa: E402
from quant_defaults import heldout  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TARGET = 0.30


def ppl(model, windows: torch.Tensor, device: str) -> float:
    model.to(device)
    with torch.no_grad():
        value = perplexity(model, windows.reshape(-1).to(device), windows.shape[1],
                           windows.shape[1])[0]
    model.cpu()
    return value


@torch.no_grad()
def perturbed_mha(model, scale: float, seed: int):
    """The MHA model of the module docstring (a new model; ``model`` is left as it is)."""
    mha = copy.deepcopy(model)
    gqa.expand_to_mha(mha, shuffle_seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for att in gqa_arch.attention_layers(mha):
        for proj in (att.module.k_proj, att.module.v_proj):
            w = proj.weight
            w += scale * w.std() * torch.randn(w.shape, generator=gen)
    return mha


def cpu_step_seconds(model, calib: torch.Tensor, steps: int) -> float:
    """Seconds per recovery step (``qkvo``) on the CPU with two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        student = copy.deepcopy(model)
        gqa.convert_model(student, 1, "contiguous", "mean", progress=False)
        rec = gqa_recover.recover(student, model, calib, 0, steps, "qkvo", device="cpu",
                                  progress=False)
    finally:
        torch.set_num_threads(threads)
    return rec.seconds / rec.steps


def run(a: argparse.Namespace) -> dict:
    path = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(str(path))
    windows = heldout(tok, a.eval, a.eval_windows, a.window)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    original = gqa.load_model(path)
    start = time.perf_counter()
    calib, check = load_calibration_split(tok, a.calib, a.num_samples, a.seq_len, 0,
                                          8, original.to(dev))
    original.cpu()
    out = {"calibration_s": round(time.perf_counter() - start, 1), "rows": {}}
    if a.cpu_probe_steps:
        step = cpu_step_seconds(original, calib, a.cpu_probe_steps)
        out["cpu_2thread_step_s"] = round(step, 2)
        if a.recover_steps is None and not a.recover_seconds:
            a.recover_steps = max(1, int(gqa_recover.RECOVER_SECONDS / step))
    out["recover_steps"] = a.recover_steps
    rows = out["rows"]

    def record(name: str, model, reference: str, **extra) -> None:
        rows[name] = {"ppl": ppl(model, windows, dev), "reference": reference,
                      "num_kv_heads": model.config.num_key_value_heads, **extra}
        ref = rows.get(reference, rows[name])["ppl"]
        rows[name]["vs_reference"] = rows[name]["ppl"] / ref - 1
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
        write(a, out)

    def convert(teacher, heads: int, grouping: str, merge: str, trains: tuple, ref: str):
        converted = copy.deepcopy(teacher)
        t = time.perf_counter()
        result = gqa.convert_model(converted, heads, grouping, merge, calib, progress=False)
        extra = {"convert_s": round(time.perf_counter() - t, 1), "calib_loss": result.calib_loss}
        name = f"{ref} -> {heads} {grouping}/{merge}"
        record(name, converted, ref, **extra)
        for train in trains:
            student = copy.deepcopy(converted)
            rec = gqa_recover.recover(student, teacher, calib, a.recover_seconds,
                                      a.recover_steps, train, device=dev, progress=False)
            record(f"{name} + recovery {train}", student, ref, **extra, recover_train=train,
                   recover_steps=rec.steps, recover_s=round(rec.seconds, 1),
                   loss_curve=rec.loss_curve)

    orig = f"original ({original.config.num_key_value_heads} kv heads)"
    record(orig, original, orig)
    trains = tuple(t for t in a.trains.split(",") if t)
    for merge in a.merges.split(","):
        convert(original, 1, "contiguous", merge, trains, orig)
    if not a.mha:
        return out
    kv = original.config.num_key_value_heads
    mha = perturbed_mha(original, a.perturb, a.seed)
    name = f"mha ({mha.config.num_key_value_heads} kv heads, shuffled, perturbed {a.perturb})"
    record(name, mha, orig)
    for grouping in gqa.GROUPINGS:
        for merge in gqa.MERGES:
            if merge in a.merges.split(","):
                convert(mha, kv, grouping, merge, trains[-1:] if merge == "mean" else (), name)
    return out


def targets(results: dict) -> list[dict]:
    """The issue's GQA targets, as far as the rows measured so far go."""
    rows, out = results["rows"], []
    merged = [r for k, r in rows.items() if k.startswith("original") and "-> 1" in k]
    if merged:
        best = min(merged, key=lambda r: r["ppl"])
        out.append({"name": "original -> 1 K/V head, best row: held-out perplexity vs the "
                    "original", "value": round(best["vs_reference"], 4), "target": TARGET,
                    "better": "lower", "met": best["vs_reference"] <= TARGET})
    mha = {k: r for k, r in rows.items() if k.startswith("mha") and "recovery" not in k}
    con = next((r for k, r in mha.items() if "contiguous/mean" in k), None)
    sim = next((r for k, r in mha.items() if "similarity/mean" in k), None)
    if con and sim:
        out.append({"name": "perturbed MHA -> original K/V heads: similarity grouping below "
                    "contiguous (mean merge, no recovery)", "value": round(sim["ppl"], 3),
                    "target": f"< {con['ppl']:.3f}", "better": "lower",
                    "met": sim["ppl"] < con["ppl"]})
    return out


def markdown(doc: dict) -> str:
    r = doc["results"]
    lines = ["# Opt-GQA conversion with recovery: SmolLM2-135M", "",
             f"Held-out text: {doc['settings']['eval_windows']} windows of "
             f"{doc['settings']['window']} tokens spread over `{doc['settings']['eval']}`. "
             f"Calibration: `{doc['settings']['calib']}`, {doc['settings']['num_samples']} x "
             f"{doc['settings']['seq_len']} tokens (calibration took {r['calibration_s']} s). "
             f"Recovery: {r['recover_steps']} steps of 4 windows; one step took "
             f"{r.get('cpu_2thread_step_s', '?')} s on the CPU with 2 threads. "
             f"Machine: {doc['machine']}. Command: `{doc['command']}`.", "",
             "| row | perplexity | vs reference | K/V heads | convert s | recovery |",
             "|---|---:|---:|---:|---:|---|"]
    for name, row in r["rows"].items():
        rec = (f"{row['recover_train']}, {row['recover_steps']} steps, {row['recover_s']} s"
               if "recover_train" in row else "")
        lines.append(f"| {name} | {row['ppl']:.3f} | {row['vs_reference']:+.1%} | "
                     f"{row['num_kv_heads']} | {row.get('convert_s', '')} | {rec} |")
    lines += report.notes_and_targets_md(doc)
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--calib", default=None)
    p.add_argument("--eval", required=True)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--recover-steps", type=int, default=None,
                   help="default: what two CPU threads make in --recover-seconds (the probe)")
    p.add_argument("--recover-seconds", type=float, default=0.0,
                   help="time budget of each recovery (with --recover-steps: whichever ends "
                   "first)")
    p.add_argument("--trains", default="kv,qkvo", help="recovery variants, comma-separated")
    p.add_argument("--merges", default="mean,lstsq")
    p.add_argument("--no-mha", dest="mha", action="store_false", help="SmolLM2 rows only")
    p.add_argument("--cpu-probe-steps", type=int, default=3)
    p.add_argument("--perturb", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--out", default=str(RESULTS / "gqa-quality"))
    a = p.parse_args()
    a.started = report.now()
    write(a, run(a))
    print(json.dumps(json.loads(Path(a.out + ".json").read_text())["targets"], indent=2))


def write(a: argparse.Namespace, results: dict) -> None:
    """The report as measured so far (rewritten after every row)."""
    head = {"machine": report.cpu_machine() + (f", {torch.cuda.get_device_name()}"
                                               if torch.cuda.is_available() else ""),
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "transformers": __import__("transformers").__version__},
            "date": a.started, "command": report.command(), "commit": report.commit()}
    settings = {k: getattr(a, k) for k in ("model", "calib", "eval", "num_samples", "seq_len",
                                           "eval_windows", "window", "recover_steps",
                                           "recover_seconds", "perturb")}
    doc = {**head, "settings": settings, "results": results, "notes": a.note,
           "targets": targets(results)}
    report.write_atomic(Path(a.out + ".json"), json.dumps(doc, indent=2) + "\n")
    report.write_atomic(Path(a.out + ".md"), markdown(doc))


if __name__ == "__main__":
    main()
