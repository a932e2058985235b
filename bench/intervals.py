"""Intervals and paired comparisons of evaluation rows: ``stats`` applied to what a row keeps
in ``row["samples"]`` (see ``evaluation.VisionProbeTask.score_samples``,
``TextSimilarityTask.score_samples`` and ``vlm_eval.score_row``).

Rows written before rows carried samples still get an interval for a proportion, from the
accuracy and the number of test samples in the task description (Wilson needs only k and n);
other metrics and every paired comparison need the samples, and are None without them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from turbo_fx.bench import stats

# metric -> (sample key of the labels, sample key of the predictions, task key of the count);
# without a labels key the predictions are right / wrong flags.
PROPORTIONS = {
    "probe_top1": ("label", "probe", "test_samples"),
    "knn_top1": ("label", "knn", "test_samples"),
    "polarity_probe": ("polarity_label", "polarity_prediction", "polarity_sentences"),
    "class_accuracy": ("label", "first_class", None),
    "exact_match": (None, "exact", None),
    "agreement": (None, "agrees", None),
}
MEANS = ("cosine", "loglik")  # per-sample values whose mean is the metric

# The bootstraps take a second or more per text row; the markdown and every plot ask for the
# same ones. Keyed by the samples objects themselves (held here, so their ids are never reused).
_memo: dict[tuple, tuple] = {}


def _memoised(objects: tuple, name: str, compute):
    key = tuple(id(o) for o in objects) + (name,)
    if key not in _memo:
        _memo[key] = (objects, compute())
    return _memo[key][1]


def correct(row: dict, metric: str) -> Optional[np.ndarray]:
    """Per sample, whether the row got it right; None for a non-proportion or without samples."""
    samples = row.get("samples")
    if metric not in PROPORTIONS or not samples:
        return None
    label, prediction, _ = PROPORTIONS[metric]
    if label is None:
        return np.asarray(samples[prediction], dtype=bool)
    return np.asarray(samples[prediction]) == np.asarray(samples[label])


def metric_interval(row: dict, metric: str, task: dict) -> Optional[tuple[float, float]]:
    """The 95% interval of ``row["metrics"][metric]``, or None where it cannot be had."""
    outcomes = correct(row, metric)
    if outcomes is not None:
        return stats.wilson_interval(int(outcomes.sum()), len(outcomes))
    if metric in PROPORTIONS:
        n = task.get(PROPORTIONS[metric][2])
        if not n:
            return None
        # The accuracy was k / n for a whole k (the polarity folds are of equal size, so their
        # mean is k / n too); rounding recovers k from the stored float.
        return stats.wilson_interval(int(round(row["metrics"][metric] * n)), int(n))
    samples = row.get("samples")
    if not samples:
        return None
    if metric in MEANS:
        return _memoised((samples,), metric, lambda: stats.bootstrap_mean(samples[metric]))
    if metric == "lee_spearman":
        return _memoised((samples,), metric, lambda: stats.document_spearman_bootstrap(
            samples["lee_cosine"], samples["lee_human"]))
    return None


def compare(row_a: dict, row_b: dict, metric: str) -> Optional[stats.Comparison]:
    """``row_a`` against ``row_b`` on ``metric`` over the same samples; None without samples."""
    a, b = row_a.get("samples"), row_b.get("samples")
    if not a or not b:
        return None
    if metric in PROPORTIONS:
        label = PROPORTIONS[metric][0]
        if label and a[label] != b[label]:
            raise ValueError(f"{row_a['label']!r} and {row_b['label']!r} were not scored on the same samples")
        return stats.paired_proportions(correct(row_a, metric), correct(row_b, metric))
    if metric in MEANS:
        return _memoised((a, b), metric, lambda: stats.paired_bootstrap_mean(a[metric], b[metric]))
    if metric == "lee_spearman":
        if a["lee_human"] != b["lee_human"]:
            raise ValueError(f"{row_a['label']!r} and {row_b['label']!r} were not scored on the same documents")
        return _memoised((a, b), metric, lambda: stats.paired_document_spearman_bootstrap(
            a["lee_cosine"], b["lee_cosine"], a["lee_human"]))
    return None


def comparison_pairs(rows: Sequence[dict]) -> list[tuple[dict, dict]]:
    """The pairs the paired-comparison table shows: every row (once per label) against the
    baseline, then each Turbo row of the components table against redundancy-only and
    semantic-only at the same r."""
    baseline = next((r for r in rows if r["method"] == "baseline"), None)
    pairs, seen = [], set()
    if baseline is not None:
        for row in rows:
            if row["method"] != "baseline" and row["label"] not in seen:
                seen.add(row["label"])
                pairs.append((row, baseline))
    components = [r for r in rows if r["group"] == "components"]
    for row in components:
        if row["method"] != "turbo":
            continue
        for other_method in ("redundancy-only", "semantic-only"):
            for other in components:
                if other["method"] == other_method and other["options"].get("r") == row["options"].get("r"):
                    pairs.append((row, other))
    return pairs
