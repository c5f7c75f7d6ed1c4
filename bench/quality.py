"""Compression quality report: perplexity, time and size of GPTQ, RTN, gptqmodel and GQA + GPTQ.

On one model (default SmolLM2-135M), calibrating on one text and evaluating perplexity on the
first ``--eval-tokens`` tokens of another (windows of ``--window`` tokens every ``--stride``):

- fp32 (the source) and fp16 (its weights rounded to float16, computed in float32);
- round-to-nearest vs GPTQ (act-order; symmetric unless ``--asym``; ``--mse``: the clipping
  search) at 4 and 3 bits, group size 64;
- gptqmodel's GPTQ on the same calibration batch and settings (``bench/gptqmodel_quantize.py``,
  run in a subprocess; skipped with a note if gptqmodel is not installed), as it saves it
  (unquantized tensors in float32) and with those tensors rounded to float16 like ours;
- Opt-GQA 3 -> 1 K/V heads (similarity grouping, least-squares merge) followed by GPTQ 4-bit;
- the GQA rows of ``bench/results/gqa-quality.json`` (``bench/gqa_quality.py``), if present.

Every finished row is cached in ``--workdir`` (rows.json and the checkpoints), so a rerun only
does what is missing. Writes ``bench/results/<--name>.json`` and ``.md`` (default ``quality``;
another name writes a report of its own, without the sections other scripts keep in
quality.md)::

    python bench/quality.py --calib ../shared/data/austen/prideprejudice.txt \\
        --eval ../shared/data/austen/emma.txt --workdir /tmp/optgptq-quality
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from optgptq.compress.calib import load_calibration, load_texts
from optgptq.compress.eval import evaluate
from optgptq.compress.quant.checkpoint import save_checkpoint
from optgptq.compress.quant.pipeline import MATMUL_PRECISIONS, quantize_model
from optgptq.compress.quant.quantizer import QuantSpec
from optgptq.models.hub import resolve_model

sys.path.insert(0, str(Path(__file__).parent))
import report  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NOTES = [
    "gptqmodel 7.6.0 runs in float32 (its default bfloat16 is about 60x slower on this CPU), "
    "calibration batch size 16, act_group_aware off (plain GPTQ with act-order, as ours), on the "
    "same token batch.",
    "Times are wall clock on a 2-core machine shared with other jobs (the load during a run is "
    "in the notes below). Ours include loading the model; gptqmodel's include its loading and "
    "packing, not saving.",
    "Our GPTQ makes one forward pass per decoder layer (each group of linears is quantized in a "
    "pre-hook on the input the already-quantized model gives it); gptqmodel runs one pass per "
    "group of linears plus a replay, five per layer.",
    "RTN rows are round-to-nearest with the same groups (act-order has no meaning without a "
    "Hessian).",
]
GPTQMODEL = "gptqmodel w4 g64"
GPTQMODEL_FP16 = "gptqmodel w4 g64, unquantized tensors in fp16"


def _rows(workdir: Path) -> dict:
    f = workdir / "rows.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _save_rows(workdir: Path, rows: dict) -> None:
    (workdir / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")


def _fp16_copy(src: Path, out: Path) -> Path:
    if not out.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float16)
        model.save_pretrained(str(out))
        AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    return out


def _quantize(src: Path, out: Path, spec: QuantSpec, method: str, calib,
              precision: str = "medium") -> float:
    qm = quantize_model(src, spec, method, calib if method == "gptq" else None,
                        matmul_precision=precision)
    save_checkpoint(qm, src, out, overwrite=True)
    return qm.seconds


def _gptqmodel(src: Path, out: Path, calib_file: Path, workdir: Path,
               a: argparse.Namespace) -> float:
    """Seconds gptqmodel took (a finished run recorded in gptqmodel.json is reused)."""
    record = workdir / "gptqmodel.json"
    if out.is_dir() and record.is_file():
        return json.loads(record.read_text())["seconds"]
    cmd = [sys.executable, str(Path(__file__).parent / "gptqmodel_quantize.py"), "--model",
           str(src), "--calib-ids", str(calib_file), "--out", str(out), "--bits", "4",
           "--group-size", "64", "--act-order"] + ["--asym"] * a.asym + ["--mse"] * a.mse
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2")
    with open(workdir / "gptqmodel.log", "w") as log:     # gptqmodel writes logs/ into its cwd
        done = subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=log,
                              text=True, check=True)
    record.write_text(done.stdout.strip().splitlines()[-1])
    return json.loads(record.read_text())["seconds"]


def _fp16_rest(src: Path, out: Path) -> Path:
    """A copy of a GPTQ checkpoint with its unquantized float tensors in float16 (as ours)."""
    if not out.is_dir():
        shutil.copytree(src, out)
        for f in src.glob("*.safetensors"):
            state = load_file(str(f))
            save_file({k: v.half() if v.dtype == torch.float32 else v for k, v in state.items()},
                      str(out / f.name), metadata={"format": "pt"})
    return out


def run(a: argparse.Namespace) -> dict:
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = resolve_model(a.model)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    calib = load_calibration(tokenizer, a.calib, a.num_samples, a.seq_len, a.seed)
    calib_file = work / f"calib-{a.num_samples}x{a.seq_len}.pt"
    torch.save(calib, calib_file)
    text = "\n\n".join(load_texts(a.eval))
    rows = _rows(work)

    def row(name: str, make) -> None:
        if name in rows or name in a.skip:
            return
        path, seconds, extra = make()
        start = time.perf_counter()
        result = evaluate(path, text, a.window, a.stride, a.eval_tokens).to_dict()
        rows[name] = {**result, "quantize_s": seconds, "eval_s": time.perf_counter() - start,
                      **extra}
        print(f"{name}: {rows[name]}", flush=True)
        _save_rows(work, rows)

    row("fp16", lambda: (_fp16_copy(src, work / "fp16"), None, {}))

    def quantized(bits: int, method: str) -> None:
        spec = QuantSpec(bits, 64, sym=not a.asym, desc_act=True, mse=a.mse)
        out = work / f"{method}-w{bits}g64"
        row(f"{method} w{bits} g64", lambda: (out, _quantize(src, out, spec, method, calib,
                                                             a.matmul_precision),
                                               {"matmul_precision": a.matmul_precision}))

    quantized(4, "gptq")
    if GPTQMODEL_FP16 not in rows:
        if importlib.util.find_spec("gptqmodel"):       # run in a subprocess, never imported
            out = work / "gptqmodel-w4g64"
            row(GPTQMODEL, lambda: (out, _gptqmodel(src, out, calib_file, work, a), {}))
            row(GPTQMODEL_FP16, lambda: (_fp16_rest(out, work / "gptqmodel-w4g64-fp16rest"),
                                         rows[GPTQMODEL]["quantize_s"], {}))
        else:
            print("gptqmodel is not installed: its row is skipped", flush=True)
    quantized(4, "rtn")
    quantized(3, "gptq")
    quantized(3, "rtn")
    gqa_name = "gqa 3->1 similarity/lstsq + gptq w4 g64"
    if gqa_name not in rows:
        from optgptq.compress.gqa import convert as gqa

        def make_gqa():
            shutil.rmtree(work / "gqa1", ignore_errors=True)
            start = time.perf_counter()
            conv = gqa.convert_folder(src, work / "gqa1", 1, "similarity", "lstsq", calib,
                                      progress=False)
            convert_s = time.perf_counter() - start
            out = work / "gqa1-gptq-w4g64"
            spec = QuantSpec(4, 64, sym=not a.asym, desc_act=True, mse=a.mse)
            seconds = _quantize(work / "gqa1", out, spec, "gptq", calib, a.matmul_precision)
            return out, seconds, {"convert_s": convert_s, "gqa_calib_loss": conv.calib_loss,
                                  "matmul_precision": a.matmul_precision}

        row(gqa_name, make_gqa)
    row("fp32", lambda: (src, None, {}))
    return rows


def targets(rows: dict, gqa_doc: dict | None, calib: str) -> list[dict]:
    """The issue's GPTQ targets as measured at this report's calibration setting ``calib``
    (e.g. "256 x 512"; the issue states them for 256 x 512 tokens), and gqa-quality.json's."""
    fp16, ours = rows["fp16"]["perplexity"], rows["gptq w4 g64"]
    out = [{"name": f"GPTQ 4-bit g64 perplexity vs fp16 (relative increase), {calib}",
            "value": round(ours["perplexity"] / fp16 - 1, 4), "target": 0.10,
            "better": "lower", "met": ours["perplexity"] / fp16 - 1 <= 0.10}]
    gm = rows.get(GPTQMODEL_FP16)
    if gm:
        out.append({"name": "GPTQ 4-bit g64 perplexity, no worse than gptqmodel (both with "
                    f"unquantized tensors in fp16), {calib}",
                    "value": round(ours["perplexity"], 4), "target": round(gm["perplexity"], 4),
                    "better": "lower", "met": ours["perplexity"] <= gm["perplexity"]})
        speedup = gm["quantize_s"] / ours["quantize_s"]
        out.append({"name": "GPTQ 4-bit g64 quantization speed-up over gptqmodel (same data, "
                    f"settings, machine), {calib}", "value": round(speedup, 2), "target": 3.0,
                    "better": "higher", "met": speedup >= 3.0})
    for t in (gqa_doc or {}).get("targets", []):
        out.append({**t, "name": f"[gqa-quality.json] {t['name']}"})
    return out


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def markdown(doc: dict) -> str:
    r, rows = doc["results"], doc["results"]["rows"]
    fp16 = rows["fp16"]["perplexity"]
    lines = [
        "# Compression quality: SmolLM2-135M", "",
        f"Calibration: `{r['calib']}`, {r['num_samples']} x {r['seq_len']} tokens (seed "
        f"{r['seed']}). Evaluation: perplexity on the first {r['eval_tokens']} tokens of "
        f"`{r['eval']}`, windows of {r['window']} every {r['stride']} tokens. GPTQ (ours and "
        f"gptqmodel's): act-order, {'asymmetric' if r.get('asym') else 'symmetric'}, "
        f"{'clipping search (mse 2.4), ' if r.get('mse') else ''}damp 0.01, true-sequential; "
        "RTN: same groups and range search, no error feedback. Weight bytes "
        "are the checkpoint's tensors (unquantized tensors in float16 except the fp32 row). "
        f"Machine: {doc['machine']}. Command: `{doc['command']}`.", "",
        "| model | perplexity | vs fp16 | quantize s | weights | KV bytes/token |",
        "|---|---:|---:|---:|---:|---:|"]
    order = ["fp32", "fp16", "rtn w4 g64", "gptq w4 g64", GPTQMODEL, GPTQMODEL_FP16, "rtn w3 g64",
             "gptq w3 g64"]
    for name in sorted(rows, key=lambda n: order.index(n) if n in order else len(order)):
        row = rows[name]
        secs = "" if row["quantize_s"] is None else f"{row['quantize_s']:.0f}"
        lines.append(f"| {name} | {row['perplexity']:.3f} | {row['perplexity'] / fp16 - 1:+.1%} "
                     f"| {secs} | {_size(row['weight_bytes'])} | {row['kv_bytes_per_token']} |")
    gqa_rows = r.get("gqa_quality_rows")
    if gqa_rows:
        lines += ["", "GQA rows from `bench/results/gqa-quality.json` (its own evaluation "
                  "settings, see that file):", "", "| model | perplexity | K/V heads | notes |",
                  "|---|---:|---:|---|"]
        for name, row in gqa_rows.items():
            ppl = f"{row['ppl']:.3f}" if "ppl" in row else ""
            note = {k: v for k, v in row.items() if k not in ("ppl", "num_kv_heads")}
            lines.append(f"| {name} | {ppl} | {row['num_kv_heads']} | {json.dumps(note)} |")
    if doc.get("name", "quality") == "quality":
        lines += _gptqt_section()
    lines += ["", "## Notes", ""] + [f"- {n}" for n in NOTES + doc["results"].get("notes", [])]
    lines += ["", "## Targets", "", "| target | value | goal | met |", "|---|---:|---:|---|"]
    for t in doc["targets"]:
        lines.append(f"| {t['name'].replace('|', chr(92) + '|')} | {t['value']} | {t['target']} ({t['better']}) | "
                     f"{'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def _other_sections(path: Path) -> str:
    """Sections other reports keep in quality.md between ``<!-- name:begin -->`` and
    ``<!-- name:end -->`` (e.g. bench/dgq_quality.py's), carried over when it is rewritten."""
    old = path.read_text() if path.is_file() else ""
    pattern = r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->"
    return "".join("\n" + m.group(0) + "\n" for m in re.finditer(pattern, old, flags=re.S))


def _gptqt_section() -> list[str]:
    """The GPTQT section from ``gptqt-quality.json`` (``bench/gptqt_quality.py``), if present."""
    f = RESULTS / "gptqt-quality.json"
    if not f.is_file():
        return []
    sys.path.insert(0, str(Path(__file__).parent))
    from gptqt_quality import section

    return section(json.loads(f.read_text()))


def parser(description: str, workdir: str) -> argparse.ArgumentParser:
    """The arguments every quality report takes (bench/quality.py, gptqt_quality.py,
    dgq_quality.py): model, calibration and evaluation texts and windows, rows to skip."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--calib", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--workdir", default=workdir)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--skip", action="append", default=[], help="a row not to compute (repeat)")
    return p


def header(a: argparse.Namespace) -> dict:
    """A quality report's machine, versions, date, command, commit and its run settings."""
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    if importlib.util.find_spec("gptqmodel"):
        versions["gptqmodel"] = importlib.metadata.version("gptqmodel")
    settings = {k: getattr(a, k) for k in ("model", "calib", "eval", "num_samples", "seq_len",
                                           "seed", "eval_tokens", "window", "stride")}
    return {"machine": report.cpu_machine(), "versions": versions, "date": report.now(),
            "command": report.command(), "commit": report.commit(), "settings": settings}


def rewrite_markdown() -> None:
    """Regenerate quality.md from quality.json, keeping the marked sections of other reports."""
    quality_file, md_path = RESULTS / "quality.json", RESULTS / "quality.md"
    if quality_file.is_file():
        report.write_atomic(md_path, markdown(json.loads(quality_file.read_text()))
                            + _other_sections(md_path))


def main() -> None:
    p = parser(__doc__.splitlines()[0], "/tmp/optgptq-quality")
    p.add_argument("--asym", action="store_true", help="asymmetric GPTQ/RTN (default symmetric)")
    p.add_argument("--mse", action="store_true", help="GPTQ/RTN with the clipping search")
    p.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default="medium",
                   help="our GPTQ's calibration forward (see optgptq quantize)")
    p.add_argument("--name", default="quality", help="results file name (bench/results/NAME.json)")
    p.add_argument("--note", action="append", default=[], help="a note for the report (repeat)")
    a = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows = run(a)
    gqa_file = RESULTS / "gqa-quality.json"   # its rows and targets belong to quality.md
    gqa_doc = (json.loads(gqa_file.read_text()) if gqa_file.is_file() and a.name == "quality"
               else None)
    head = header(a)
    results = {**head.pop("settings"), "asym": a.asym, "mse": a.mse, "notes": a.note,
               "rows": rows, "gqa_quality_rows": (gqa_doc or {}).get("results", {}).get("rows")}
    calib = f"{a.num_samples} x {a.seq_len} calibration tokens"
    doc = {"name": a.name, **head, "results": results, "targets": targets(rows, gqa_doc, calib)}
    report.write_atomic(RESULTS / f"{a.name}.json", json.dumps(doc, indent=2) + "\n")
    if a.name == "quality":
        rewrite_markdown()
    else:
        report.write_atomic(RESULTS / f"{a.name}.md", markdown(doc))
    print(json.dumps(doc["targets"], indent=2))


if __name__ == "__main__":
    main()
