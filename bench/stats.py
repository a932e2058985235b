"""Small-sample statistics for the evaluation tables: how far a number measured on a few hundred
or thousand samples could move, and whether two methods scored on the *same* samples differ.

Pure functions over counts and arrays (numpy, scipy). Every interval is a two-sided 95% one
by default. Bootstraps draw from ``numpy.random.default_rng(seed)`` with a fixed seed, so a
table rendered twice from the same JSON shows the same intervals.

* ``wilson_interval``: a proportion (k of n correct).
* ``paired_proportions``: two methods' correctness on the same samples: the difference in
  accuracy, Newcombe's interval for it, the exact McNemar p.
* ``bootstrap_mean`` / ``paired_bootstrap_mean``: the mean of a per-sample value (cosine).
* ``document_spearman_bootstrap`` / ``paired_document_spearman_bootstrap``: Spearman over the
  pairs of a set of documents, resampling documents (pairs of one document are not independent).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials. Unlike the normal approximation it
    stays inside [0, 1] and has a non-zero width at k = 0 and k = n."""
    if n <= 0:
        raise ValueError(f"a proportion needs n > 0, got n={n}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n], got k={k}, n={n}")
    z2 = _z(confidence) ** 2
    p = k / n
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = math.sqrt(z2) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    # At k = 0 (k = n) the bound is 0 (1) exactly; rounding must not put it outside [0, 1].
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Exact McNemar test: two-sided binomial test of the discordant pairs (``a_only`` samples
    right under method A only, ``b_only`` under B only) against an even split. No discordant
    pairs: no evidence of a difference, p = 1."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    from scipy.stats import binom

    # Under p = 1/2 the binomial is symmetric, so the two tails are equal.
    return float(min(1.0, 2.0 * binom.cdf(min(a_only, b_only), n, 0.5)))


@dataclass(frozen=True)
class Comparison:
    """Method A against method B on the same samples: ``difference`` = A - B (positive: A
    scores higher), its interval, a two-sided p for "no difference" and how it was found."""

    difference: float
    low: float
    high: float
    p_value: float
    test: str
    n: int
    a_only: Optional[int] = None  # proportions: samples right under A only
    b_only: Optional[int] = None


def paired_proportions(correct_a: Sequence[bool], correct_b: Sequence[bool],
                       confidence: float = CONFIDENCE) -> Comparison:
    """Accuracy of A minus accuracy of B, both scored on the same samples. The interval is
    Newcombe's (1998, method 10: Wilson intervals of the two accuracies, combined with the
    correlation of the paired outcomes), no resampling; p is the exact McNemar test."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need two equal-length, non-empty 1-d outcome arrays, got {a.shape} and {b.shape}")
    n = len(a)
    both, a_only, b_only = int(np.sum(a & b)), int(np.sum(a & ~b)), int(np.sum(~a & b))
    neither = n - both - a_only - b_only
    p_a, p_b = (both + a_only) / n, (both + b_only) / n
    low_a, high_a = wilson_interval(both + a_only, n, confidence)
    low_b, high_b = wilson_interval(both + b_only, n, confidence)
    phi = _phi(both, a_only, b_only, neither)
    below = math.sqrt(max(0.0, (p_a - low_a) ** 2 - 2 * phi * (p_a - low_a) * (high_b - p_b) + (high_b - p_b) ** 2))
    above = math.sqrt(max(0.0, (high_a - p_a) ** 2 - 2 * phi * (high_a - p_a) * (p_b - low_b) + (p_b - low_b) ** 2))
    difference = p_a - p_b
    return Comparison(difference, max(-1.0, difference - below), min(1.0, difference + above),
                      mcnemar_exact_p(a_only, b_only), "McNemar exact", n, a_only, b_only)


def _phi(both: int, a_only: int, b_only: int, neither: int) -> float:
    """Correlation of the two methods' outcomes (the 2x2 table's phi); 0 when a margin is empty,
    where it is undefined."""
    margins = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    if margins == 0:
        return 0.0
    return (both * neither - a_only * b_only) / math.sqrt(margins)


def percentile_interval(replicates: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central ``confidence`` share of bootstrap replicates (NaN replicates dropped)."""
    values = np.asarray(replicates, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan, math.nan
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_p(replicates: np.ndarray) -> float:
    """Two-sided p for "the statistic is 0" from bootstrap replicates of it: twice the smaller
    share of replicates on either side of 0 (the smallest 1 - confidence at which the
    percentile interval would exclude 0), at most 1. Resolution 1 / replicates: 0 means below it."""
    values = np.asarray(replicates, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan
    return float(min(1.0, 2 * min(np.mean(values <= 0), np.mean(values >= 0))))


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_mean(values: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED,
                   confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-sample values (samples resampled)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("no values")
    return percentile_interval(x[_resample_indices(len(x), resamples, seed)].mean(axis=1), confidence)


def paired_bootstrap_mean(values_a: Sequence[float], values_b: Sequence[float], resamples: int = RESAMPLES,
                          seed: int = SEED, confidence: float = CONFIDENCE) -> Comparison:
    """Mean of A minus mean of B over the same samples; each replicate resamples the samples
    once for both, so what the two share (the same hard images) cancels."""
    a, b = np.asarray(values_a, dtype=np.float64), np.asarray(values_b, dtype=np.float64)
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(f"need two equal-length, non-empty arrays, got {a.shape} and {b.shape}")
    replicates = (a - b)[_resample_indices(len(a), resamples, seed)].mean(axis=1)
    low, high = percentile_interval(replicates, confidence)
    return Comparison(float(np.mean(a - b)), low, high, bootstrap_p(replicates), "paired bootstrap", len(a))


# ----------------------------------------------------------------------------------------
# Spearman over the pairs of a set of documents


def documents_of(pairs: int) -> int:
    """How many documents give ``pairs`` unordered pairs (n (n - 1) / 2 = pairs)."""
    n = int(round((1 + math.sqrt(1 + 8 * pairs)) / 2))
    if n * (n - 1) // 2 != pairs:
        raise ValueError(f"{pairs} is not n (n - 1) / 2 for any n")
    return n


def square(upper: Sequence[float]) -> np.ndarray:
    """The symmetric matrix whose entries above the diagonal are ``upper`` (row by row, as
    ``numpy.triu_indices(n, 1)`` orders them); the diagonal is 0 and never read."""
    values = np.asarray(upper, dtype=np.float64)
    n = documents_of(len(values))
    matrix = np.zeros((n, n))
    rows, cols = np.triu_indices(n, k=1)
    matrix[rows, cols] = values
    matrix[cols, rows] = values
    return matrix


def resampled_pairs(documents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs among a resample of documents: every two positions i < j of the resample,
    except where both draws are the same document (a document is not a pair with itself).
    A document drawn twice enters each of its pairs twice."""
    docs = np.asarray(documents)
    i, j = np.triu_indices(len(docs), k=1)
    keep = docs[i] != docs[j]
    return docs[i][keep], docs[j][keep]


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given the mean of the ranks they span (as scipy's ``rankdata``, which
    is slow to call thousands of times on small arrays)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((starts + ends + 1) / 2)[np.cumsum(starts_group) - 1]
    return ranks


def _centred_ranks(x: np.ndarray) -> np.ndarray:
    ranks = average_ranks(x)
    return ranks - ranks.mean()


def _rank_correlation(rx: np.ndarray, ry: np.ndarray) -> float:
    """Pearson correlation of centred ranks; NaN when either side is constant."""
    denominator = math.sqrt(float(np.dot(rx, rx) * np.dot(ry, ry)))
    return float(np.dot(rx, ry) / denominator) if denominator > 1e-12 else math.nan


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (average ranks for ties); NaN when either side is constant."""
    if len(x) < 2:
        return math.nan
    return _rank_correlation(_centred_ranks(x), _centred_ranks(y))


def spearman_of_pairs(similarity_upper: Sequence[float], human_upper: Sequence[float]) -> float:
    return _spearman(np.asarray(similarity_upper, dtype=np.float64), np.asarray(human_upper, dtype=np.float64))


def _document_replicates(similarities: Sequence[Sequence[float]], human_upper: Sequence[float],
                         resamples: int, seed: int) -> np.ndarray:
    """``[resamples, len(similarities)]`` Spearman replicates, every similarity matrix scored
    on the same resampled documents in each replicate (NaN where a resample has fewer than two
    distinct documents or constant scores)."""
    human = square(human_upper)
    mats = [square(s) for s in similarities]
    if any(m.shape != human.shape for m in mats):
        raise ValueError("similarity and human scores must cover the same documents")
    out = np.full((resamples, len(mats)), math.nan)
    for r, docs in enumerate(_resample_indices(len(human), resamples, seed)):
        i, j = resampled_pairs(docs)
        if len(i) < 2:
            continue
        human_ranks = _centred_ranks(human[i, j])
        for m, mat in enumerate(mats):
            out[r, m] = _rank_correlation(_centred_ranks(mat[i, j]), human_ranks)
    return out


def document_spearman_bootstrap(similarity_upper: Sequence[float], human_upper: Sequence[float],
                                resamples: int = RESAMPLES, seed: int = SEED,
                                confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Interval for the Spearman correlation between model similarities and human scores over
    all pairs of n documents, both given as upper triangles. The n (n - 1) / 2 pairs are not
    independent samples (each document is in n - 1 of them), so documents are resampled and
    Spearman is recomputed over the pairs among the drawn documents (``resampled_pairs``).
    Resamples where it is undefined (fewer than three distinct documents, or constant scores;
    only likely with a handful of documents) are left out."""
    replicates = _document_replicates([similarity_upper], human_upper, resamples, seed)[:, 0]
    return percentile_interval(replicates, confidence)


def paired_document_spearman_bootstrap(similarity_a: Sequence[float], similarity_b: Sequence[float],
                                       human_upper: Sequence[float], resamples: int = RESAMPLES,
                                       seed: int = SEED, confidence: float = CONFIDENCE) -> Comparison:
    """Spearman of A minus Spearman of B against the same human scores, with the same
    resampled documents for both in each replicate (see ``document_spearman_bootstrap``;
    resamples with constant scores count for neither)."""
    replicates = _document_replicates([similarity_a, similarity_b], human_upper, resamples, seed)
    differences = replicates[:, 0] - replicates[:, 1]
    low, high = percentile_interval(differences, confidence)
    difference = spearman_of_pairs(similarity_a, human_upper) - spearman_of_pairs(similarity_b, human_upper)
    return Comparison(difference, low, high, bootstrap_p(differences), "document bootstrap",
                      documents_of(len(np.asarray(human_upper))))


def speedup_interval(baseline: Sequence[float], times: Sequence[float], resamples: int = RESAMPLES,
                     seed: int = 0, confidence: float = 0.95) -> dict:
    """median(baseline) / median(times), with a percentile-bootstrap interval that resamples
    the rounds (index i of both lists ran in the same round)."""
    a, b = np.asarray(baseline, dtype=np.float64), np.asarray(times, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need equal, non-empty round lists, got {a.shape} and {b.shape}")
    idx = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
    replicates = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    low, high = percentile_interval(replicates, confidence)
    return {"speedup": float(np.median(a) / np.median(b)), "low": low, "high": high}
