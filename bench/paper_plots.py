"""Tables and plots of ``bench/paper.py``'s results: ``python bench/paper_plots.py RESULTS.json``.

Writes, beside the json: ``<name>.md`` (one row per variant: the paper's metrics, with the
spread of the repeats, and the targets) and PNGs: ``<name>-<metric>.png`` (a bar per variant,
error bars from min to max of the repeats) and ``<name>-context.png`` (long-run total tokens/s
against the context length). Needs matplotlib (``pip install 'optgptq[bench]'``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METRICS = [("requests_per_s", "requests/s"), ("total_tokens_per_s", "total tokens/s"),
           ("generate_tokens_per_s", "generate tokens/s"), ("latency_s", "latency (s)"),
           ("peak_gib", "peak GPU memory (GiB)")]
PAPER = {"MHA": {"requests_per_s": 0.42, "total_tokens_per_s": 230.74,
                 "generate_tokens_per_s": 119.38, "latency_s": 52.30},
         "Opt-GQA": {"requests_per_s": 0.70, "total_tokens_per_s": 239.14,
                     "generate_tokens_per_s": 122.55, "latency_s": 57.40}}


def _cell(stat: dict, digits: int) -> str:
    return (f"{stat['mean']:.{digits}f} ({stat['min']:.{digits}f}-{stat['max']:.{digits}f})"
            if stat["max"] != stat["min"] else f"{stat['mean']:.{digits}f}")


def table(res: dict) -> str:
    s = res["settings"]
    lines = [f"# Opt-GPTQ paper experiment on {res['machine']}", "",
             f"{res['model']}, {res['weights']}. Last run {res['date']}, commit {res['commit']} "
             f"(each variant's commit in brackets), "
             f"torch {res['versions']['torch']}, Triton {res['versions']['triton']}.", "",
             f"Throughput run: {s['num_requests']} requests of {s['input_len']} prompt + "
             f"{s['output_len']} generated tokens, all at once, KV pool {s['kv_gib']} GiB for every "
             f"variant; mean (min-max) of {s['repeats']} runs after {s.get('warmup', 0)} untimed "
             "warm-up run(s).", "",
             "| variant | req/s | total tok/s | generate tok/s | latency s | peak GiB | KV pool "
             "GiB | KV bytes/token | batch-1 generate tok/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, v in res["variants"].items():
        t = v["throughput"]
        commit = t.get("commit") or v.get("commit")  # per workload since --workloads
        lines.append(f"| {name} ({commit}) | {_cell(t['requests_per_s'], 2)} | "
                     f"{_cell(t['total_tokens_per_s'], 0)} | "
                     f"{_cell(t['generate_tokens_per_s'], 0)} | {_cell(t['latency_s'], 1)} | "
                     f"{t['peak_gib']['max']:.1f} | {t['kv_pool_gib']:.1f} | "
                     f"{t['kv_bytes_per_token']} | "
                     f"{_cell(v['small']['generate_tokens_per_s'], 1)} |")
    if "hf" in res:
        h = res["hf"]
        lines.append(f"| transformers generate (Opt-GQA-8 fp16, {h['requests']} requests, "
                     f"batches of {h['batch']}) | {h['requests_per_s']:.2f} | "
                     f"{h['total_tokens_per_s']:.0f} | {h['generate_tokens_per_s']:.0f} | "
                     f"{h['latency_s']:.1f} | {h['peak_gib']:.1f} | | | |")
    for name, p in PAPER.items():
        lines.append(f"| paper, DCU: {name} | {p['requests_per_s']} | {p['total_tokens_per_s']} "
                     f"| {p['generate_tokens_per_s']} | {p['latency_s']} | | | | |")
    lines += ["", f"Long-sequence run: {s['long_requests']} requests per context, "
              f"{s['long_output']} generated tokens each; the pool holds the longest run's "
              f"requests at once (the same batch capacity for every variant).", "",
              "| variant | " + " | ".join(f"{c} tok/s" for c in s["contexts"])
              + " | peak GiB (longest) | KV pool GiB |",
              "|---|" + "---|" * (len(s["contexts"]) + 2)]
    for name, v in res["variants"].items():
        ctx = v["long"]["contexts"]
        longest = ctx[str(max(s["contexts"]))]
        lines.append(f"| {name} | " + " | ".join(
            f"{ctx[str(c)]['total_tokens_per_s']['mean']:.0f}" for c in s["contexts"])
            + f" | {longest['peak_gib']['max']:.1f} | {v['long']['pool']['kv_pool_gib']:.1f} |")
    lines += ["", "| target | value | target | met |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']} | {t['target']} | {'yes' if t['met'] else 'no'} |"
              for t in res.get("targets", [])]
    if res.get("notes"):
        lines += [""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def plots(res: dict, stem: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["variants"])
    written = []
    for key, label in METRICS:
        stats = [res["variants"][n]["throughput"][key] for n in names]
        mean = [st["mean"] for st in stats]
        err = [[st["mean"] - st["min"] for st in stats], [st["max"] - st["mean"] for st in stats]]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(names, mean, yerr=err, capsize=4,
               color=["#c44" if n.startswith("MHA") else "#48c" for n in names])
        ax.set_ylabel(label)
        ax.set_title(f"{label}, throughput run ({res['machine']})", fontsize=10)
        ax.tick_params(axis="x", labelsize=8, rotation=15)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-{key}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ctxs = res["settings"]["contexts"]
    for n in names:
        ctx = res["variants"][n]["long"]["contexts"]
        ax.plot(ctxs, [ctx[str(c)]["total_tokens_per_s"]["mean"] for c in ctxs], marker="o",
                label=n)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens per request")
    ax.set_ylabel("total tokens/s")
    ax.set_title(f"long-sequence throughput ({res['machine']})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = stem.with_name(f"{stem.name}-context.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return written + [path]


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/paper_plots.py bench/results/paper/<gpu>.json")
    path = Path(sys.argv[1])
    res = json.loads(path.read_text())
    md = path.with_suffix(".md")
    md.write_text(table(res))
    for p in [md, *plots(res, path.with_suffix(""))]:
        print("wrote", p)


if __name__ == "__main__":
    main()
