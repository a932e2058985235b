"""Writing evaluation results: markdown tables with 95% intervals and paired comparisons
(``intervals``), the JSON with every row's per-sample data, and the accuracy-FLOPs plots.

The tables leave time out: the evaluation runs the rewritten graphs eagerly, on whatever shares
the cores, to measure what merging keeps; ``turbo-fx bench`` (``make bench``) measures speed.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from turbo_fx.bench import intervals, output, plots

GROUP_TITLES = {
    "components": "Ranking components at matched FLOPs (paper Table 7 / Figure 4): redundancy only "
                  "(`semantic=False`, ToMe-style), semantic only (`redundancy=False`), Turbo (both)",
    "fusion": "Fusion of R and I (paper Table 8)",
    "alpha": "Balancing coefficient alpha (paper Figure 5)",
    "threshold": "Floor on the token count, `min_tokens` (paper Table 9)",
}
SPEED_NOTE = ("Speed: not measured here (the rewritten graphs run eagerly, on shared cores); "
              "`make bench` times turbo against Inductor.")


def rows_table(rows: Sequence[dict], metric_names: Sequence[str], task: Optional[dict] = None) -> str:
    head = ["configuration", "GFLOPs/sample", "FLOPs saved"]
    for m in metric_names:
        head += [m, "drop"]
    extras = sorted(k for k in rows[0].get("extra", {}) if k.endswith("flop_reduction")) if rows else []
    head += [k.replace("_flop_reduction", " FLOPs saved") for k in extras] + ["tokens per block"]
    body = []
    for r in rows:
        saved = r["flop_reduction"]
        line = [r["label"], f"{r['gflops_per_sample']:.3f}", f"{saved * 100:.1f}%" if saved is not None else "-"]
        for m in metric_names:
            value = format_interval(r["metrics"][m], intervals.metric_interval(r, m, task or {}))
            line += [value, f"{r['drop'][m]:+.4f}" if r["method"] != "baseline" else "-"]
        for k in extras:
            value = r.get("extra", {}).get(k)
            line.append(f"{value * 100:.1f}%" if value is not None else "-")
        tokens = r.get("tokens_per_block")
        line.append(output.tokens(tokens) if tokens else ("FALLBACK" if r["fallbacks"] else "-"))
        body.append(line)
    return output.table(head, body)


def format_interval(value: float, interval: Optional[tuple[float, float]]) -> str:
    """``0.8135 [0.796, 0.830]``; ``[-]`` where the row has no interval. An interval narrower
    than 0.01 (cosines) gets 4 decimals: at 3, 0.9999 would read [1.000, 1.000]."""
    if interval is None:
        return f"{value:.4f} [-]"
    digits = 3 if interval[1] - interval[0] >= 0.01 else 4
    return f"{value:.4f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def comparison_cell(comparison) -> tuple[str, str]:
    """``(+0.0020 [-0.0035, +0.0075], 0.523 (14:10))``: difference, interval, p and, for
    proportions, the discordant counts (right under A only : under B only)."""
    if comparison is None:
        return "-", "-"
    counts = f" ({comparison.a_only}:{comparison.b_only})" if comparison.a_only is not None else ""
    return output.difference(comparison), output.p_value(comparison.p_value) + counts


def comparisons_table(rows: Sequence[dict], metric_names: Sequence[str]) -> Optional[str]:
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
    return output.table(head, body)


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


def markdown(results, machine: str, command: str) -> str:
    out = [f"# Fidelity of turbo merging: {results.model}", "", f"Machine: {machine}.", f"Command: `{command}`", ""]
    task = ", ".join(f"{k}={v}" for k, v in results.task.items())
    out += [f"Task: {task}. Rewritten graphs run by `{results.inner_backend}`; "
            f"total {results.seconds_total / 60:.1f} min.", "", SPEED_NOTE, ""]
    baseline = [r for r in results.rows if r["method"] == "baseline"]
    for group, title in GROUP_TITLES.items():
        rows = [r for r in results.rows if r["group"] == group and r["method"] != "baseline"]
        if rows:
            out += [f"## {title}", "", rows_table(baseline + rows, results.metric_names, task=results.task), ""]
    paired = comparisons_table(results.rows, results.metric_names)
    out += ["## Paired comparisons on the same samples", ""]
    out += [paired, "", COMPARISONS_NOTE, ""] if paired else [
        "None: these rows were written without per-sample data, which paired tests need.", ""]
    out += ["Columns: FLOPs saved = 1 - FLOPs / unmerged FLOPs on the same inputs (turbo_fx.recording "
            "with FLOP counting: matmuls, SDPA, the merge op); drop = baseline metric - row metric (positive "
            "= worse); tokens per block = tokens entering the first block → tokens entering the last (texts: "
            "in the first graph compiled, the shortest bucket of Lee documents).", "", INTERVALS_NOTE, ""]
    out += [f"- {note}" for note in results.notes]
    return "\n".join(out) + "\n"


def write_results(results, out_dir: str, stem: str, machine: dict, machine_line: str, command: str,
                  plot_metrics: Sequence[str]) -> dict[str, str]:
    """Write ``<stem>.md``, ``<stem>.json.gz`` and the plots into ``out_dir``; returns the paths."""
    paths = write_report(results, out_dir, stem, machine_line, command, plot_metrics)
    paths["json"] = output.save_json({"machine": machine, "command": command, **results.to_dict()},
                                     os.path.join(out_dir, f"{stem}.json.gz"))
    return paths


def write_report(results, out_dir: str, stem: str, machine_line: str, command: str,
                 plot_metrics: Sequence[str]) -> dict[str, str]:
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
    paths["markdown"] = os.path.join(out_dir, f"{stem}.md")
    with open(paths["markdown"], "w") as f:
        f.write(markdown(results, machine_line, command) + "\n" + "\n\n".join(figures) + "\n")
    return paths


def rerender(json_path: str) -> dict[str, str]:
    """Rewrite the markdown and plots next to ``json_path`` from the JSON alone; the JSON is left
    as it is. The machine line is the one the markdown already shows (the JSON keeps the machine
    as a dict, not that line); the plotted metrics are every metric but cosine."""
    out_dir, name = os.path.split(json_path)
    stem = name.removesuffix(".gz").removesuffix(".json")
    with open(os.path.join(out_dir, f"{stem}.md")) as f:
        machine_line = next(line for line in f if line.startswith("Machine: "))
    machine_line = machine_line.strip()[len("Machine: "):].removesuffix(".")
    results, _, command = load_results(json_path)
    return write_report(results, out_dir, stem, machine_line, command,
                        [m for m in results.metric_names if m != "cosine"])


def load_results(json_path: str):
    """``(EvalResults, machine dict, command)`` from a JSON file ``write_results`` wrote."""
    from turbo_fx.bench.evaluation import EvalResults

    payload = output.load_json(json_path)
    machine, command = payload.pop("machine"), payload.pop("command")
    return EvalResults(**payload), machine, command
