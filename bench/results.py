"""Writing evaluation results: markdown tables (tabulate) with 95% intervals and paired
comparisons (``intervals``), the raw JSON, and the plots."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from tabulate import tabulate

from turbo_fx.bench import intervals, plots

GROUP_TITLES = {
    "components": "Ranking components at matched FLOPs (paper Table 7 / Figure 4): redundancy only "
                  "(`semantic=False`, ToMe-style), semantic only (`redundancy=False`), Turbo (both)",
    "fusion": "Fusion of R and I (paper Table 8)",
    "alpha": "Balancing coefficient alpha (paper Figure 5)",
    "threshold": "Floor on the token count, `min_tokens` (paper Table 9)",
}


def rows_table(rows: Sequence[dict], metric_names: Sequence[str], fmt: str = "github",
               task: Optional[dict] = None) -> str:
    head = ["configuration", "GFLOPs/sample", "FLOPs saved", "ms/sample", "speed-up"]
    for m in metric_names:
        head += [m, "drop"]
    extras = sorted(k for k in rows[0].get("extra", {}) if k.endswith("flop_reduction")) if rows else []
    head += [k.replace("_flop_reduction", " FLOPs saved") for k in extras]
    head += ["tokens per block"]
    body = []
    for r in rows:
        line = [
            r["label"],
            f"{r['gflops_per_sample']:.3f}",
            f"{r['flop_reduction'] * 100:.1f}%" if r["flop_reduction"] is not None else "-",
            f"{r['ms_per_sample']:.1f}" if r["ms_per_sample"] else "-",
            f"{r['speedup']:.2f}x" if r.get("speedup") else "-",
        ]
        for m in metric_names:
            value = format_interval(r["metrics"][m], intervals.metric_interval(r, m, task or {}))
            line += [value, f"{r['drop'][m]:+.4f}" if r["method"] != "baseline" else "-"]
        for k in extras:
            value = r.get("extra", {}).get(k)
            line.append(f"{value * 100:.1f}%" if value is not None else "-")
        tokens = r.get("tokens_per_block")
        line.append(_tokens(tokens) if tokens else ("FALLBACK" if r["fallbacks"] else "-"))
        body.append(line)
    return tabulate(body, headers=head, tablefmt=fmt)


def format_interval(value: float, interval: Optional[tuple[float, float]]) -> str:
    """``0.8135 [0.796, 0.830]``; ``[-]`` where the row has no interval. An interval narrower
    than 0.01 (cosines) gets 4 decimals: at 3, 0.9999 would read [1.000, 1.000]."""
    if interval is None:
        return f"{value:.4f} [-]"
    digits = 3 if interval[1] - interval[0] >= 0.01 else 4
    return f"{value:.4f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def format_p(p: float) -> str:
    # Below 0.001 the exact value says nothing more (and a bootstrap p cannot resolve it).
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def comparison_cell(comparison) -> tuple[str, str]:
    """``(+0.0020 [-0.0035, +0.0075], 0.523 (14:10))``: difference, interval, p and, for
    proportions, the discordant counts (right under A only : under B only)."""
    if comparison is None:
        return "-", "-"
    c = comparison
    difference = f"{c.difference:+.4f} [{c.low:+.4f}, {c.high:+.4f}]"
    counts = f" ({c.a_only}:{c.b_only})" if c.a_only is not None else ""
    return difference, format_p(c.p_value) + counts


def comparisons_table(rows: Sequence[dict], metric_names: Sequence[str], fmt: str = "github") -> Optional[str]:
    """One line per pair of ``intervals.comparison_pairs``; None when no row has samples."""
    pairs = [(a, b) for a, b in intervals.comparison_pairs(rows) if a.get("samples") and b.get("samples")]
    if not pairs:
        return None
    head = ["A", "B"]
    for m in metric_names:
        head += [f"{m}: A - B [95%]", "p"]
    body = []
    for a, b in pairs:
        line = [a["label"], b["label"]]
        for m in metric_names:
            line += list(comparison_cell(intervals.compare(a, b, m)))
        body.append(line)
    # Without disable_numparse tabulate would print a p of "1.000" as "1".
    return tabulate(body, headers=head, tablefmt=fmt, disable_numparse=True)


COMPARISONS_NOTE = (
    "A - B: the metric of row A minus that of row B, both scored on the same samples (positive: A "
    "keeps more). Accuracies: interval by Newcombe's method for paired proportions, p from the exact "
    "McNemar test, (x:y) = samples right under A only : right under B only. Cosine and Spearman: "
    "paired percentile bootstrap (2000 resamples, seed 0; Spearman resamples Lee's documents, not "
    "pairs), p = twice the share of resampled differences on the far side of 0.")

INTERVALS_NOTE = (
    "Intervals: [low, high] is a 95% interval. Accuracies (probe, k-NN, polarity): Wilson score "
    "interval for k of n test samples. Cosine: percentile bootstrap of the mean over samples. Lee "
    "Spearman: percentile bootstrap resampling Lee's documents (recomputing Spearman over the pairs "
    "among the drawn documents). 2000 resamples, seed 0. [-]: the JSON has no per-sample data for it.")


def _tokens(tokens: Sequence[int]) -> str:
    return f"{tokens[0]}→{tokens[-1]}" if len(tokens) > 1 else str(tokens[0])


def markdown(results, machine: str, command: str, extra: Sequence[str] = ()) -> str:
    out = [f"# Fidelity of turbo merging: {results.model}", "",
           f"Machine: {machine}.", f"Command: `{command}`", ""]
    task = ", ".join(f"{k}={v}" for k, v in results.task.items())
    out += [f"Task: {task}. Rewritten graphs run by `{results.inner_backend}`; "
            f"total {results.seconds_total / 60:.1f} min.", ""]
    out += list(extra)
    baseline = [r for r in results.rows if r["method"] == "baseline"]
    for group, title in GROUP_TITLES.items():
        rows = [r for r in results.rows if r["group"] == group and r["method"] != "baseline"]
        if not rows:
            continue
        out += [f"## {title}", "", rows_table(baseline + rows, results.metric_names, task=results.task), ""]
    paired = comparisons_table(results.rows, results.metric_names)
    out += ["## Paired comparisons on the same samples", ""]
    out += [paired, "", COMPARISONS_NOTE, ""] if paired else [
        "None: these rows were written without per-sample data, which paired tests need.", ""]
    out += ["Columns: FLOPs saved = 1 - FLOPs / unmerged FLOPs on the same inputs (turbo_fx.recording "
            "with FLOP counting: matmuls, SDPA, the merge op); ms/sample = measured on this machine "
            "(images: median over batches; texts: total of a second, timed call per length bucket); "
            "speed-up = baseline ms / row ms; drop = baseline metric - row metric (positive = worse); "
            "tokens per block = tokens entering the first block → tokens entering the last (texts: in the first "
            "graph compiled, the shortest bucket of Lee documents).", "", INTERVALS_NOTE, ""]
    for note in results.notes:
        out.append(f"- {note}")
    return "\n".join(out) + "\n"


def write_results(results, out_dir: str, stem: str, machine: dict, machine_line: str, command: str,
                  plot_metrics: Sequence[str], extra_markdown: Sequence[str] = ()) -> dict[str, str]:
    """Write ``<stem>.md``, ``<stem>.json`` and the plots into ``out_dir``; returns the paths."""
    paths = write_report(results, out_dir, stem, machine_line, command, plot_metrics, extra_markdown)
    paths["json"] = os.path.join(out_dir, f"{stem}.json")
    with open(paths["json"], "w") as f:
        f.write(results_json({"machine": machine, "command": command, **results.to_dict()}))
    return paths


def write_report(results, out_dir: str, stem: str, machine_line: str, command: str,
                 plot_metrics: Sequence[str], extra_markdown: Sequence[str] = ()) -> dict[str, str]:
    """Write ``<stem>.md`` and the plots (not the JSON) into ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for metric in plot_metrics:
        paths[f"tradeoff_{metric}"] = plots.plot_tradeoff(
            results, metric, os.path.join(out_dir, f"{stem}_tradeoff_{metric}.png"))
        alpha = plots.plot_alpha(results, metric, os.path.join(out_dir, f"{stem}_alpha_{metric}.png"))
        if alpha:
            paths[f"alpha_{metric}"] = alpha
    figures = [f"![{name}]({os.path.basename(p)})" for name, p in paths.items()]
    text = markdown(results, machine_line, command, extra_markdown) + "\n" + "\n\n".join(figures) + "\n"
    paths["markdown"] = os.path.join(out_dir, f"{stem}.md")
    with open(paths["markdown"], "w") as f:
        f.write(text)
    return paths


def rerender(json_path: str) -> dict[str, str]:
    """Rewrite the markdown and plots next to ``json_path`` from the JSON alone, with today's
    tables and plots; the JSON is left as it is. The machine line is the one the markdown
    already shows (the JSON keeps the machine as a dict, not that line); the plotted metrics
    are those ``turbo-fx eval`` plots (every metric but cosine)."""
    out_dir, name = os.path.split(json_path)
    stem = os.path.splitext(name)[0]
    with open(os.path.join(out_dir, f"{stem}.md")) as f:
        machine_line = next(line for line in f if line.startswith("Machine: "))
    machine_line = machine_line.strip()[len("Machine: "):].removesuffix(".")
    results, _, command = load_results(json_path)
    return write_report(results, out_dir, stem, machine_line, command,
                        [m for m in results.metric_names if m != "cosine"])


def results_json(payload: dict) -> str:
    """``payload`` as indented JSON, except that each per-sample list of a row is written on one
    line (indented, 2000 test images would take 2000 lines per list)."""
    stash, rows = {}, []
    for i, row in enumerate(payload.get("rows", [])):
        if "samples" in row:
            key = f"@samples-{i}@"
            stash[key] = row["samples"]
            row = {**row, "samples": key}
        rows.append(row)
    text = json.dumps({**payload, "rows": rows}, indent=1)
    for key, samples in stash.items():
        lines = [f"{json.dumps(name)}: {json.dumps(values, separators=(',', ':'))}" for name, values in samples.items()]
        text = text.replace(json.dumps(key), "{\n" + ",\n".join(lines) + "\n}", 1)
    return text


def load_results(json_path: str):
    """``(EvalResults, machine dict, command)`` from a JSON file ``write_results`` wrote."""
    from turbo_fx.bench.evaluation import EvalResults

    with open(json_path) as f:
        payload = json.load(f)
    machine, command = payload.pop("machine"), payload.pop("command")
    return EvalResults(**payload), machine, command
