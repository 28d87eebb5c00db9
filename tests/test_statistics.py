"""relprop.evaluation.statistics against independent checks: a constant sample, the textbook
standard error, scipy's documented Wilcoxon example, a hand-counted exact Wilcoxon p, the
coverage of the bootstrap CI on samples with a known mean, and the paired CI's pairing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from relprop.errors import InputError
from relprop.evaluation.statistics import mean_sem_ci, paired_comparison


def test_constant_sample_has_its_value_as_interval_and_zero_se():
    assert mean_sem_ci([0.25] * 40) == (0.25, 0.0, 0.25, 0.25)


def test_mean_and_standard_error_are_the_textbook_ones():
    values = [1.0, 2.0, 4.0, 7.0]  # mean 3.5, sample variance 7, SE sqrt(7 / 4)
    mean, sem, low, high = mean_sem_ci(values, n_boot=2000)
    assert mean == 3.5 and sem == pytest.approx(math.sqrt(7 / 4), rel=1e-12)
    assert 1.0 <= low < 3.5 < high <= 7.0  # a bootstrap mean never leaves the sample's range


def test_non_finite_values_are_left_out_and_one_value_has_no_interval():
    mean, sem, low, high = mean_sem_ci([2.0, float("nan"), None, float("inf")])
    assert mean == 2.0 and all(math.isnan(v) for v in (sem, low, high))
    assert all(math.isnan(v) for v in mean_sem_ci([]))


def test_seeded_bootstrap_is_reproducible():
    values = np.random.default_rng(3).normal(size=30)
    assert mean_sem_ci(values, seed=7) == mean_sem_ci(values, seed=7)


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials = 200
    covered = 0
    for _ in range(trials):
        sample = rng.normal(loc=0.4, scale=0.2, size=60)
        _, _, low, high = mean_sem_ci(sample, n_boot=1000, seed=int(rng.integers(1 << 30)))
        covered += low <= 0.4 <= high
    # the percentile bootstrap at n = 60 covers a little under 95 %; 200 trials: SE ~ 1.6 %
    assert 0.88 <= covered / trials <= 0.99


def test_wilcoxon_matches_scipys_documented_example():
    # scipy.stats.wilcoxon's docstring: Darwin's paired height differences of 15 plant pairs,
    # two-sided p = 0.04125976562500001 (exact distribution).
    d = np.array([6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75], dtype=float)
    result = paired_comparison(d, np.zeros_like(d), n_boot=2000)
    assert result["wilcoxon_p"] == pytest.approx(0.04125976562500001, rel=1e-12)
    assert result["n"] == 15 and result["mean_diff"] == pytest.approx(d.mean())


def test_wilcoxon_exact_p_counted_by_hand():
    # differences 1, 2, 3, 4 (all positive): W+ = 10 is the largest of 2**4 equally likely sign
    # patterns, so the two-sided exact p is 2 / 16.
    result = paired_comparison([2.0, 4.0, 6.0, 8.0], [1.0, 2.0, 3.0, 4.0], n_boot=2000)
    assert result["wilcoxon_p"] == pytest.approx(2 / 16)


def test_paired_ci_follows_the_pairs_not_the_spread_of_each_method():
    rng = np.random.default_rng(1)
    b = rng.uniform(0, 1, size=80)  # large spread between images
    a = b + 0.05 + rng.normal(scale=0.001, size=80)  # a tiny, consistent improvement
    result = paired_comparison(a, b)
    assert result["lo"] > 0.04 and result["hi"] < 0.06  # unpaired, the CI would span +-0.1
    assert result["wilcoxon_p"] < 1e-10


def test_identical_methods_have_zero_difference_and_no_test():
    result = paired_comparison([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])
    assert result["mean_diff"] == 0.0 and result["lo"] == result["hi"] == 0.0
    assert math.isnan(result["wilcoxon_p"])


def test_pairs_with_a_missing_value_are_dropped_and_lengths_must_match():
    result = paired_comparison([1.0, float("nan"), 3.0, 5.0], [0.0, 1.0, 1.0, 1.0], n_boot=500)
    assert result["n"] == 3 and result["mean_diff"] == pytest.approx((1 + 2 + 4) / 3)
    with pytest.raises(InputError, match="one length"):
        paired_comparison([1.0, 2.0], [1.0])
