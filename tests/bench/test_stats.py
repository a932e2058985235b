"""Small-sample statistics (bench/stats.py) against hand computations, scipy and cases whose
answer follows from how they are built."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest, rankdata, spearmanr

from turbo_fx.bench import fidelity, stats

Z2 = 1.959963984540054 ** 2


def test_wilson_hand_cases():
    low, high = stats.wilson_interval(8, 10)
    assert (low, high) == (pytest.approx(0.4902, abs=5e-4), pytest.approx(0.9433, abs=5e-4))
    # k = 0: the lower end is 0 and the upper z^2 / (n + z^2); k = n mirrors it.
    assert stats.wilson_interval(0, 10) == (0.0, pytest.approx(Z2 / (10 + Z2), rel=1e-12))
    assert stats.wilson_interval(10, 10) == (pytest.approx(10 / (10 + Z2), rel=1e-12), 1.0)
    assert stats.wilson_interval(0, 1)[1] < 1.0


def test_wilson_narrows_with_n_and_rejects_bad_counts():
    widths = [np.subtract(*stats.wilson_interval(n // 5 * 4, n)[::-1]) for n in (10, 100, 1000, 10000)]
    assert all(a > b for a, b in zip(widths, widths[1:]))
    assert widths[-1] == pytest.approx(2 * 1.96 * math.sqrt(0.8 * 0.2 / 10000), rel=0.01)  # normal limit
    with pytest.raises(ValueError):
        stats.wilson_interval(0, 0)
    with pytest.raises(ValueError):
        stats.wilson_interval(11, 10)


@pytest.mark.parametrize("a_only, b_only", [(3, 10), (10, 3), (0, 7), (25, 31), (1, 1), (40, 12)])
def test_mcnemar_is_a_two_sided_binomial_test_of_the_discordant_pairs(a_only, b_only):
    expected = binomtest(a_only, a_only + b_only, 0.5, alternative="two-sided").pvalue
    assert stats.mcnemar_exact_p(a_only, b_only) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_hand_cases():
    assert stats.mcnemar_exact_p(0, 5) == pytest.approx(2 * 0.5 ** 5)  # all 5 discordant pairs one way
    assert stats.mcnemar_exact_p(0, 0) == 1.0
    assert stats.mcnemar_exact_p(4, 4) == 1.0


def outcomes(both, a_only, b_only, neither):
    a = np.array([1] * both + [1] * a_only + [0] * b_only + [0] * neither, dtype=bool)
    b = np.array([1] * both + [0] * a_only + [1] * b_only + [0] * neither, dtype=bool)
    return a, b


def test_paired_proportions_counts_difference_and_p():
    a, b = outcomes(both=80, a_only=2, b_only=9, neither=9)
    c = stats.paired_proportions(a, b)
    assert (c.n, c.a_only, c.b_only) == (100, 2, 9)
    assert c.difference == pytest.approx(-0.07)
    assert c.p_value == pytest.approx(binomtest(2, 11, 0.5).pvalue)
    assert c.low < c.difference < c.high < 0  # 2 vs 9 discordant: B better, the interval excludes 0
    swapped = stats.paired_proportions(b, a)
    assert (swapped.low, swapped.high) == (pytest.approx(-c.high), pytest.approx(-c.low))


def test_paired_proportions_identical_methods():
    a, _ = outcomes(both=90, a_only=0, b_only=0, neither=10)
    c = stats.paired_proportions(a, a)
    assert c.difference == 0.0 and c.p_value == 1.0
    # No discordant pair in 100 still allows a discordant rate up to Wilson's bound for 0 of
    # 100, and |difference| can be no larger than that rate.
    assert c.low == pytest.approx(-c.high) and 0 < c.high < stats.wilson_interval(0, 100)[1]


def test_newcombe_interval_agrees_with_a_paired_bootstrap():
    rng = np.random.default_rng(3)
    a = rng.random(2000) < 0.8
    b = a.copy()
    flip = rng.random(2000) < 0.04
    b[flip] = ~b[flip]
    newcombe = stats.paired_proportions(a, b)
    boot = stats.paired_bootstrap_mean(a.astype(float), b.astype(float), resamples=4000, seed=1)
    assert newcombe.difference == pytest.approx(boot.difference)
    assert newcombe.low == pytest.approx(boot.low, abs=0.002)
    assert newcombe.high == pytest.approx(boot.high, abs=0.002)


def test_bootstrap_mean_contains_the_mean_shrinks_with_n_and_is_reproducible():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.9, 0.05, 100), rng.normal(0.9, 0.05, 10000)
    lo_s, hi_s = stats.bootstrap_mean(small)
    lo_l, hi_l = stats.bootstrap_mean(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) == pytest.approx((hi_s - lo_s) / 10, rel=0.25)  # width ~ 1 / sqrt(n)
    assert (hi_s - lo_s) == pytest.approx(2 * 1.96 * small.std() / 10, rel=0.15)
    assert stats.bootstrap_mean(small) == stats.bootstrap_mean(small)
    assert stats.bootstrap_mean(small, seed=1) != stats.bootstrap_mean(small)


def test_paired_bootstrap_mean_cancels_what_the_samples_share():
    rng = np.random.default_rng(0)
    shared = rng.normal(0.9, 0.05, 500)  # hard and easy samples, the same for both methods
    a, b = shared + 0.002 + rng.normal(0, 0.001, 500), shared
    c = stats.paired_bootstrap_mean(a, b)
    assert c.low < 0.002 < c.high and c.low > 0 and c.p_value < 0.001
    unpaired_width = 2 * 1.96 * math.sqrt(2 * 0.05 ** 2 / 500)
    assert c.high - c.low < unpaired_width / 20


def test_average_ranks_and_spearman_match_scipy():
    x = np.array([3.0, 1.0, 2.0, 2.0, 5.0, 2.0, 1.0])
    assert np.array_equal(stats.average_ranks(x), rankdata(x))
    rng = np.random.default_rng(0)
    a, b = rng.random(300), np.round(rng.random(300), 1)
    assert stats.spearman_of_pairs(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


def test_square_inverts_upper_triangle():
    rng = np.random.default_rng(0)
    m = rng.random((5, 5))
    m = m + m.T
    np.fill_diagonal(m, 0)
    assert np.array_equal(stats.square(fidelity.upper_triangle(m)), m)
    assert stats.documents_of(1225) == 50
    with pytest.raises(ValueError):
        stats.documents_of(7)


def test_resampled_pairs_skip_a_document_with_itself():
    i, j = stats.resampled_pairs(np.array([0, 0, 1, 2]))
    # positions (0,1) draw document 0 twice: dropped; document 0's pairs enter twice.
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 1), (0, 2), (0, 2), (1, 2)]


def four_documents(bad_last: bool):
    """Human scores 6..1 for the pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3). The model agrees in
    rank on every pair, except (if ``bad_last``) that document 3's three pairs are reversed."""
    human = np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    model = human.copy()
    if bad_last:
        model[[2, 4, 5]] = model[[5, 4, 2]] + 10  # above every other pair, in reverse order
    return model, human


def test_document_bootstrap_perfect_and_reversed_agreement():
    model, human = four_documents(bad_last=False)
    assert stats.document_spearman_bootstrap(model, human) == (1.0, 1.0)
    assert stats.document_spearman_bootstrap(-model, human) == (-1.0, -1.0)


def test_document_bootstrap_resamples_documents():
    model, human = four_documents(bad_last=True)
    point = stats.spearman_of_pairs(model, human)
    assert point < 1.0
    low, high = stats.document_spearman_bootstrap(model, human, resamples=4000)
    # Every resample without document 3 (probability (3/4)^4 = 0.32, far above 2.5%) agrees
    # perfectly, so the upper end is exactly 1; resamples heavy in document 3 score below.
    assert high == 1.0
    assert low < point


def test_paired_document_bootstrap():
    good, human = four_documents(bad_last=False)
    bad, _ = four_documents(bad_last=True)
    same = stats.paired_document_spearman_bootstrap(bad, bad, human)
    assert (same.difference, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    c = stats.paired_document_spearman_bootstrap(good, bad, human, resamples=4000)
    assert c.difference == pytest.approx(1.0 - stats.spearman_of_pairs(bad, human))
    assert c.n == 4
    # Good is 1 in every resample and never below bad; resamples without document 3 tie (0).
    assert c.low == 0.0 and c.high > 0
    # Of the 4^4 equally likely resamples, those with under 3 distinct documents have constant
    # scores and are dropped (4 + 6 * 14 = 88); of the other 168, the 36 that draw all of 0, 1, 2
    # and not 3 tie. p = 2 * 36 / 168.
    assert c.p_value == pytest.approx(2 * 36 / 168, abs=0.04)


def test_speedup_interval_brackets_the_ratio_of_medians():
    base = [1.0, 1.1, 0.9, 1.05, 0.95]
    fast = [0.5, 0.55, 0.45, 0.5, 0.52]
    v = stats.speedup_interval(base, fast)
    assert v["speedup"] == pytest.approx(np.median(base) / np.median(fast))
    assert v["low"] <= v["speedup"] <= v["high"]
    same = stats.speedup_interval(base, base)
    assert same == {"speedup": 1.0, "low": 1.0, "high": 1.0}
    with pytest.raises(ValueError):
        stats.speedup_interval([1.0], [1.0, 2.0])
