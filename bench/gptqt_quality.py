"""GPTQT vs GPTQ at 3 and 2 bits on SmolLM2-135M: perplexity, quantization time, size.

The settings of ``bench/quality.py`` (calibrate on one text, perplexity on the first
``--eval-tokens`` tokens of another, windows of ``--window`` every ``--stride``), on one
calibration batch shared by every row:

- fp16 (the reference);
- GPTQ, act-order, group size 64, symmetric (the project's default, as in quality.md) and
  asymmetric (a zero point per group, closer to GPTQT's offset), at 3 and 2 bits;
- GPTQT (:mod:`optgptq.compress.quant.gptqt`, default settings: intermediate bits = planes + 2,
  re-explore 0.7..1.1 in 9 steps) with 3 and 2 planes at group size 64, and at group size 128
  (about the bytes of GPTQ g64: GPTQT stores ``planes + 1`` float16 values per group and
  column, GPTQ one scale and a packed zero).

Every finished row is cached in ``--workdir`` (rows.json and the checkpoints), so a rerun only
does what is missing. Writes ``bench/results/gptqt-quality.json`` and regenerates
``bench/results/quality.md`` from quality.json, which then carries a GPTQT section::

    python bench/gptqt_quality.py --calib ../shared/data/austen/prideprejudice.txt \\
        --eval ../shared/data/austen/emma.txt --workdir /tmp/optgptq-gptqt-quality
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
import quality  # noqa: E402  (bench/quality.py: the fp16 copy, the markdown report)
import report  # noqa: E402

from optgptq.compress.calib import load_calibration, load_texts  # noqa: E402
from optgptq.compress.eval import evaluate  # noqa: E402
from optgptq.compress.quant.checkpoint import save_checkpoint  # noqa: E402
from optgptq.compress.quant.gptqt import GPTQTSpec  # noqa: E402
from optgptq.compress.quant.pipeline import quantize_model  # noqa: E402
from optgptq.compress.quant.quantizer import QuantSpec  # noqa: E402
from optgptq.models.hub import resolve_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ROWS = [  # name, method, bits, group size, symmetric (GPTQ only); computed in this order
    ("gptq w3 g64 sym", "gptq", 3, 64, True), ("gptqt w3 g64", "gptqt", 3, 64, None),
    ("gptq w2 g64 sym", "gptq", 2, 64, True), ("gptqt w2 g64", "gptqt", 2, 64, None),
    ("gptq w3 g64 asym", "gptq", 3, 64, False), ("gptq w2 g64 asym", "gptq", 2, 64, False),
    ("gptqt w2 g128", "gptqt", 2, 128, None), ("gptqt w3 g128", "gptqt", 3, 128, None),
]
NOTES = [
    "Run on a 2-core machine shared with other jobs at load average 6-15: times are several "
    "times those of a quiet machine (GPTQ w3 g64 sym took 300 s in quality.md, 1077 s here). "
    "The rows were computed by two processes at once (one for the 3-bit rows, one for the "
    "2-bit rows, in two workdirs, merged); rows not listed (GPTQ w3 asym, GPTQT g128) were "
    "skipped for time.",
    "bits/weight counts a quantized linear's codes and group parameters (GPTQ: a float16 scale "
    "and a packed zero per group; GPTQT: bits + 1 float16 values per group). At about equal "
    "bytes, quality.md's GPTQ w4 g64 (4.30 bits/weight, 109.2 MiB) has perplexity 35.551 "
    "against GPTQT w3 g64's 36.762 (4.00 bits/weight, 104.7 MiB).",
    "GPTQT's time is dominated by its exhaustive binary-coding search (7225 candidates per "
    "group and scale factor for 3 planes on the 5-bit grid, 308 for 2 planes on the 4-bit "
    "grid).",
]
ORDER = ["fp16", "gptq w3 g64 sym", "gptq w3 g64 asym", "gptqt w3 g64", "gptqt w3 g128",
         "gptq w2 g64 sym", "gptq w2 g64 asym", "gptqt w2 g64", "gptqt w2 g128"]


def _quantize(src: Path, out: Path, method: str, bits: int, group: int, sym: bool | None,
              calib: torch.Tensor) -> tuple[float, dict]:
    if method == "gptqt":
        spec = GPTQTSpec(bits, group_size=group)
        qm = quantize_model(src, spec, "gptqt", calib)
        save_checkpoint(qm, src, out, overwrite=True)
        return qm.seconds, {"intermediate_bits": spec.intermediate_bits,
                            "explore": list(spec.explore)}
    spec = QuantSpec(bits, group, sym=sym, desc_act=True)
    qm = quantize_model(src, spec, "gptq", calib)
    save_checkpoint(qm, src, out, overwrite=True)
    return qm.seconds, {"sym": sym, "desc_act": True}


def run(a: argparse.Namespace) -> dict:
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = resolve_model(a.model)
    calib = load_calibration(AutoTokenizer.from_pretrained(str(src)), a.calib, a.num_samples,
                             a.seq_len, a.seed)
    text = "\n\n".join(load_texts(a.eval))
    rows = quality._rows(work)

    def row(name: str, make) -> None:
        if name in rows or name in a.skip:
            return
        path, seconds, extra = make()
        start = time.perf_counter()
        result = evaluate(path, text, a.window, a.stride, a.eval_tokens).to_dict()
        rows[name] = {**result, "quantize_s": seconds, "eval_s": time.perf_counter() - start,
                      **extra}
        print(f"{name}: {rows[name]}", flush=True)
        quality._save_rows(work, rows)

    row("fp16", lambda: (quality._fp16_copy(src, work / "fp16"), None, {}))
    for name, method, bits, group, sym in ROWS:
        out = work / name.replace(" ", "-")

        def make(out=out, method=method, bits=bits, group=group, sym=sym):
            seconds, extra = _quantize(src, out, method, bits, group, sym, calib)
            return out, seconds, extra

        row(name, make)
    return rows


def section(doc: dict) -> list[str]:
    """quality.md's GPTQT section (``bench/quality.py`` includes it when the json exists)."""
    r, rows = doc["results"], doc["results"]["rows"]
    fp16 = rows["fp16"]["perplexity"]
    lines = ["", "## GPTQT vs GPTQ at 3 and 2 bits (`bench/gptqt_quality.py`, "
             "`gptqt-quality.json`)", "",
             f"Same calibration batch for every row: `{r['calib']}`, {r['num_samples']} x "
             f"{r['seq_len']} tokens (seed {r['seed']}); perplexity on the first "
             f"{r['eval_tokens']} tokens of `{r['eval']}`, windows of {r['window']} every "
             f"{r['stride']}. GPTQ: act-order, damp 0.01. GPTQT: planes = bits, intermediate "
             "bits = bits + 2, re-explore 0.7..1.1 in 9 steps, damp 0.01, no act-order. "
             f"Machine: {doc['machine']}. Command: `{doc['command']}`.", "",
             "| model | perplexity | vs fp16 | quantize s | weights | quantized linears, "
             "bits/weight |", "|---|---:|---:|---:|---:|---:|"]
    for name in ORDER:
        if name not in rows:
            continue
        row = rows[name]
        secs = "" if row["quantize_s"] is None else f"{row['quantize_s']:.0f}"
        lines.append(f"| {name} | {row['perplexity']:.3f} | {row['perplexity'] / fp16 - 1:+.1%} "
                     f"| {secs} | {row['weight_bytes'] / 2**20:.1f} MiB | "
                     f"{_bits_per_weight(name)} |")
    lines += [""] + [f"- {n}" for n in NOTES]
    lines += ["", "| target | value | goal | met |", "|---|---:|---:|---|"]
    for t in doc["targets"]:
        lines.append(f"| {t['name']} | {t['value']} | {t['target']} ({t['better']}) | "
                     f"{'yes' if t['met'] else 'NO'} |")
    return lines


def _bits_per_weight(name: str) -> str:
    """Storage per weight of a quantized linear: codes plus the group's float16 parameters
    (GPTQ: a scale and a ``bits``-bit zero; GPTQT: ``bits`` alphas and an offset)."""
    spec = next((row for row in ROWS if row[0] == name), None)
    if spec is None:
        return "16"
    _, method, bits, group, _ = spec
    extra = (bits + 1) * 16 if method == "gptqt" else 16 + bits
    return f"{bits + extra / group:.2f}"


def targets(rows: dict) -> list[dict]:
    out = []
    for bits in (3, 2):
        ours, base = rows.get(f"gptqt w{bits} g64"), rows.get(f"gptq w{bits} g64 sym")
        if ours and base:
            out.append({"name": f"GPTQT {bits}-bit g64 perplexity below GPTQ {bits}-bit g64 "
                        f"(act-order, symmetric; same calibration)",
                        "value": round(ours["perplexity"], 3),
                        "target": round(base["perplexity"], 3), "better": "lower",
                        "met": ours["perplexity"] < base["perplexity"]})
    return out


def main() -> None:
    a = quality.parser(__doc__.splitlines()[0], "/tmp/optgptq-gptqt-quality").parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows = run(a)
    head = quality.header(a)
    doc = {**head, "results": {**head.pop("settings"), "rows": rows}, "targets": targets(rows)}
    report.write_atomic(RESULTS / "gptqt-quality.json", json.dumps(doc, indent=2) + "\n")
    quality.rewrite_markdown()
    print(json.dumps(doc["targets"], indent=2))


if __name__ == "__main__":
    main()
