"""How `optgptq quantize`'s defaults were chosen: each option's effect on held-out perplexity.

Every row is an `optgptq quantize` command line on SmolLM2 (``cli.quantize_folder``, the CLI's
own code path, checkpoint written and read back), scored on text no row calibrates on: the
perplexity of ``--eval-windows`` disjoint windows of ``--window`` tokens spread evenly over the
files of ``--eval`` (Jane Austen's four novels), against the float model on the same windows.

1. the old defaults (symmetric, no act-order, no clipping search, 128 x 512 Shakespeare);
2. asymmetric + act-order + clipping search on each calibration source: Shakespeare and text
   the model generates itself (``generated``); the better source is the base of the rest;
3. one option changed at a time from that base: symmetric, no act-order, no clipping search,
   damping 0.1 and 0.001, 256 calibration samples;
4. the chosen defaults at 3 and 8 bits, round-to-nearest, and GPTQT / DGQ spot checks.

A calibration batch is drawn once per (source, samples) and shared by the rows that use it
(for ``generated`` on the GPU when one is present), so row times are quantization times after
the calibration text exists; the end-to-end time of the default command is measured
separately (the README and the report's notes say where). Rows are cached in ``--workdir``
(rows.json), so a rerun only computes what is missing; ``--max-seconds`` stops starting rows
after that long. Writes ``bench/results/quality-defaults.json`` and ``.md``::

    python bench/quant_defaults.py --eval ../shared/data/austen --workdir /tmp/qd
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from optgptq.compress.calib import load_texts, source_files, token_stream
from optgptq.compress.cli import add_quant_args
from optgptq.compress.eval import perplexity
from optgptq.compress.quant.checkpoint import load_for_eval
from optgptq.compress.quant.pipeline import load_float_model
from optgptq.compress.quant.run import calibration, quantize_folder
from optgptq.models.hub import resolve_model

sys.path.insert(0, str(Path(__file__).parent))
import report  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BASE = ["--bits", "4", "--group-size", "64"]
OLD = ["--sym", "--no-act-order", "--no-mse", "--calib", "shakespeare"]
GOOD = ["--asym", "--act-order", "--mse"]
TARGET = 0.08


def rows_to_run(best: str | None, n: int = 128) -> list[tuple[str, list[str]]]:
    """(name, flags) in order; ``best`` is the better source once both were measured, ``n``
    the calibration samples of every row but the one that doubles them."""
    size = ["--num-samples", str(n)]
    rows = [(f"old defaults: sym, no act-order, no mse, shakespeare {n}", OLD + size),
            (f"asym act-order mse, shakespeare {n}", GOOD + ["--calib", "shakespeare"] + size),
            (f"asym act-order mse, generated {n}", GOOD + ["--calib", "generated"] + size)]
    if best is None:
        return rows
    b = ["--calib", best] + size
    return rows + [
        (f"sym act-order mse, {best} {n}", ["--sym", "--act-order", "--mse"] + b),
        (f"asym act-order mse, {best} {2 * n}", GOOD + b[:2] + ["--num-samples", str(2 * n)]),
        (f"asym no-act-order mse, {best} {n}", ["--asym", "--no-act-order", "--mse"] + b),
        (f"asym act-order no-mse, {best} {n}", ["--asym", "--act-order", "--no-mse"] + b),
        (f"3-bit asym act-order mse, {best} {n}", GOOD + ["--bits", "3"] + b),
        (f"8-bit asym act-order mse, {best} {n}", GOOD + ["--bits", "8"] + b),
        (f"asym act-order mse damp 0.1, {best} {n}", GOOD + ["--damp", "0.1"] + b),
        ("rtn asym mse", ["--asym", "--mse", "--method", "rtn"]),
        (f"asym act-order mse damp 0.001, {best} {n}", GOOD + ["--damp", "0.001"] + b),
        (f"gptqt 3-bit g64, {best} {n}", ["--method", "gptqt", "--bits", "3"] + b),
        (f"dgq a8w4 g64, {best} {n}", ["--method", "dgq"] + b),
    ]


def heldout(tokenizer, source: str, n: int, window: int) -> torch.Tensor:
    """``n`` disjoint ``window``-token windows, spread evenly over the source's files."""
    files = source_files(source)
    out = []
    for i, f in enumerate(files):
        ids = token_stream(tokenizer, load_texts(str(f)))
        k = n // len(files) + (i < n % len(files))
        step = (ids.numel() - window) // max(k, 1)
        out += [ids[j * step: j * step + window] for j in range(k)]
    return torch.stack(out)


def score(path: Path, windows: torch.Tensor, device: str) -> float:
    model = load_for_eval(path).to(device)
    with torch.no_grad():
        return perplexity(model, windows.reshape(-1).to(device), windows.shape[1],
                          windows.shape[1])[0]


def run(a: argparse.Namespace) -> dict:
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = resolve_model(a.model)
    gpu = "cuda" if torch.cuda.is_available() else "cpu"
    windows = heldout(AutoTokenizer.from_pretrained(str(src)), a.eval, a.eval_windows, a.window)
    f = work / "rows.json"
    rows = json.loads(f.read_text()) if f.is_file() else {}
    if "float" not in rows:
        rows["float"] = {"perplexity": score(src, windows, gpu), "flags": []}
    batches: dict = {}
    start = time.perf_counter()

    def do(name: str, flags: list[str]) -> None:
        if name in rows or time.perf_counter() - start > a.max_seconds:
            return
        p = argparse.ArgumentParser()
        add_quant_args(p)
        q = p.parse_args(BASE + flags)
        key = (q.calib, q.num_samples, q.seq_len, q.seed, q.check_samples)
        if q.method != "rtn" and key not in batches:
            t = time.perf_counter()
            batches[key] = calibration(src, load_float_model(src).to(gpu), q, progress=False)
            print(f"calibration {key}: {time.perf_counter() - t:.0f} s", flush=True)
        summary = quantize_folder(src, work / "ckpt", q, overwrite=True,
                                  windows=batches.get(key))
        device = "cpu" if q.method == "dgq" else gpu
        rows[name] = {**summary, "flags": BASE + flags,
                      "perplexity": score(work / "ckpt", windows, device)}
        rows[name]["vs_float"] = rows[name]["perplexity"] / rows["float"]["perplexity"] - 1
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
        f.write_text(json.dumps(rows, indent=2) + "\n")

    first = rows_to_run(None, a.num_samples)
    for name, flags in first:
        if name not in a.skip:
            do(name, flags)
    shakes, gen = (rows.get(n, {}).get("perplexity", float("inf")) for n, _ in first[1:])
    best = a.source or ("generated" if gen <= shakes else "shakespeare")
    for name, flags in rows_to_run(best, a.num_samples)[3:]:
        if name not in a.skip:
            do(name, flags)
    return {"rows": rows, "best_source": best, "eval_windows": list(windows.shape)}


def markdown(doc: dict) -> str:
    r = doc["results"]
    lines = ["# Choosing `optgptq quantize`'s defaults: SmolLM2-135M", "",
             f"Held-out text: {r['eval_windows'][0]} windows of {r['eval_windows'][1]} tokens "
             f"spread evenly over `{doc['settings']['eval']}` (never used for calibration). "
             "Every row is an `optgptq quantize` command (flags below; unset ones are the "
             f"defaults at the time). Machine: {doc['machine']}. Command: `{doc['command']}`.",
             "", "| row | flags | perplexity | vs float | check estimate | quantize s |",
             "|---|---|---:|---:|---|---:|"]
    for name, row in r["rows"].items():
        est = (f"{row['check_ppl_before']:.2f} -> {row['check_ppl_after']:.2f}"
               if "check_ppl_after" in row else "")
        secs = row.get("quantize_seconds", "")
        lines.append(f"| {name} | `{' '.join(row['flags'])}` | {row['perplexity']:.3f} | "
                     f"{row.get('vs_float', 0):+.1%} | {est} | {secs} |")
    lines += report.notes_and_targets_md(doc)
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--eval", required=True, help="held-out text: a file or folder")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--workdir", default="/tmp/optgptq-quant-defaults")
    p.add_argument("--max-seconds", type=float, default=float("inf"))
    p.add_argument("--num-samples", type=int, default=128, help="calibration samples per row")
    p.add_argument("--source", default=None, help="the base source of the one-option rows "
                   "(default: the better of the two measured)")
    p.add_argument("--skip", action="append", default=[], help="a row not to compute")
    p.add_argument("--default-row", default=None, help="the row that the defaults equal")
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--out", default=str(RESULTS / "quality-defaults"))
    a = p.parse_args()
    results = run(a)
    head = {"machine": report.cpu_machine(), "versions": {
        "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": __import__("transformers").__version__},
        "date": report.now(), "command": report.command(), "commit": report.commit()}
    row = results["rows"].get(a.default_row or "")
    targets = [] if row is None else [{
        "name": "4-bit g64 with the default flags: perplexity vs float, held-out text",
        "value": round(row["vs_float"], 4), "target": TARGET, "better": "lower",
        "met": row["vs_float"] <= TARGET}]
    doc = {**head, "settings": {"model": a.model, "eval": a.eval, "window": a.window},
           "results": results, "notes": a.note, "targets": targets}
    report.write_atomic(Path(a.out + ".json"), json.dumps(doc, indent=2) + "\n")
    report.write_atomic(Path(a.out + ".md"), markdown(doc))
    print(json.dumps(targets, indent=2))


if __name__ == "__main__":
    main()
