"""Plots of evaluation results (matplotlib, no display needed: figures are drawn off-screen).

* ``plot_tradeoff``: a metric against FLOPs per sample, one line per method (the paper's
  Figure 4 on our data), the baseline as a star.
* ``plot_alpha``: a metric against the balancing coefficient alpha at one r (Figure 5),
  with redundancy-only merging at the same r as a reference line.

Each point carries its 95% interval (``intervals.metric_interval``) as an error bar, the
reference lines as a shaded band, so a gap smaller than the noise does not look like one.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from turbo_fx.bench import intervals

METHOD_STYLE = {
    "baseline": dict(color="black", marker="*", markersize=12),
    "redundancy-only": dict(color="tab:blue", marker="o"),
    "semantic-only": dict(color="tab:orange", marker="s"),
    "turbo": dict(color="tab:red", marker="D"),
    "turbo + min_tokens": dict(color="tab:purple", marker="^"),
    "turbo + keep_salient": dict(color="tab:green", marker="v"),
}
METRIC_LABEL = {
    "probe_top1": "linear-probe top-1",
    "knn_top1": "k-NN top-1",
    "cosine": "cosine to unmerged features",
    "lee_spearman": "Lee: Spearman vs human similarity",
    "polarity_probe": "polarity probe accuracy",
}


def _figure(ncols: int, width: float = 5.5, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=110)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _by_method(rows: Sequence[dict], groups: Sequence[str]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        if row["group"] in groups or row["method"] == "baseline":
            out.setdefault(row["method"], []).append(row)
    return out


def plot_tradeoff(results, metric: str, path: str, groups: Sequence[str] = ("components", "threshold"),
                  title: Optional[str] = None) -> str:
    """``metric`` against GFLOPs per sample, one line per method."""
    fig, (ax,) = _figure(1, width=6.0)
    for method, rows in _by_method(results.rows, groups).items():
        flops_of = _flops_for(metric, rows)
        rows = sorted(rows, key=flops_of)
        ax.errorbar([flops_of(r) for r in rows], [r["metrics"][metric] for r in rows],
                    yerr=error_bars(rows, metric, results.task), label=method,
                    linestyle="-" if len(rows) > 1 else "none", capsize=3, **METHOD_STYLE.get(method, dict(marker="x")))
    corpus = _corpus(metric, results.rows)
    _label_axes(ax, f"GFLOPs per {corpus} text" if corpus else "GFLOPs per sample", metric)
    return _save(fig, title or f"{results.model}: {METRIC_LABEL.get(metric, metric)} vs FLOPs", path)


def error_bars(rows: Sequence[dict], metric: str, task: dict) -> Optional[np.ndarray]:
    """``[2, len(rows)]`` distances from each row's value down and up to its interval's ends
    (0 where a row has no interval); None when none has one."""
    bars = np.zeros((2, len(rows)))
    found = False
    for i, row in enumerate(rows):
        interval = intervals.metric_interval(row, metric, task)
        if interval is not None:
            value = row["metrics"][metric]
            # A bootstrap interval can miss the point estimate by rounding; never a negative bar.
            bars[:, i] = max(0.0, value - interval[0]), max(0.0, interval[1] - value)
            found = True
    return bars if found else None


def _corpus(metric: str, rows: Sequence[dict]) -> Optional[str]:
    """The corpus a metric is measured on, when rows carry that corpus's own FLOPs (texts)."""
    prefix = metric.split("_")[0]
    if rows and f"{prefix}_gflops_per_text" in rows[0].get("extra", {}):
        return prefix
    return None


def _flops_for(metric: str, rows: Sequence[dict]):
    corpus = _corpus(metric, rows)
    if corpus:
        return lambda row: row["extra"][f"{corpus}_gflops_per_text"]
    return lambda row: row["gflops_per_sample"]


def _label_axes(ax, xlabel: str, metric: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(METRIC_LABEL.get(metric, metric))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, title: str, path: str) -> str:
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(title, 60)), fontsize="medium")
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_alpha(results, metric: str, path: str, title: Optional[str] = None) -> Optional[str]:
    """``metric`` against alpha (the "alpha" rows), redundancy-only at the same r as a line."""
    rows = sorted((r for r in results.rows if r["group"] == "alpha"), key=lambda r: r["options"]["alpha"])
    if not rows:
        return None
    r_value = rows[0]["options"]["r"]
    fig, (ax,) = _figure(1, width=6.0)
    positive = [r for r in rows if r["options"]["alpha"] > 0]
    ax.errorbar([r["options"]["alpha"] for r in positive], [r["metrics"][metric] for r in positive],
                yerr=error_bars(positive, metric, results.task), label=f"turbo r={r_value}", capsize=3,
                **METHOD_STYLE["turbo"])
    ax.set_xscale("log")
    for row in results.rows:
        if row["method"] == "redundancy-only" and row["options"].get("r") == r_value:
            _reference_line(ax, row, metric, results.task, "tab:blue", "--", f"redundancy-only r={r_value}")
        if row["method"] == "baseline":
            _reference_line(ax, row, metric, results.task, "black", ":", "baseline (no merging)")
    _label_axes(ax, "alpha (weight of the semantic value I, I scaled so 1 = uniform attention)", metric)
    return _save(fig, title or f"{results.model}: balancing coefficient alpha", path)


def _reference_line(ax, row: dict, metric: str, task: dict, color: str, linestyle: str, label: str) -> None:
    ax.axhline(row["metrics"][metric], color=color, linestyle=linestyle, label=label)
    interval = intervals.metric_interval(row, metric, task)
    if interval is not None:
        ax.axhspan(interval[0], interval[1], color=color, alpha=0.08, linewidth=0)
