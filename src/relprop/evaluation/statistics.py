"""Statistics over images that a reviewer accepts: mean, standard error and a 95 % percentile
bootstrap CI per method, and paired comparisons (bootstrap CI of the mean difference and the
Wilcoxon signed-rank test) of two methods on the same images.

scipy does the resampling and the test (`scipy.stats.bootstrap`, `scipy.stats.wilcoxon`); nothing
here is a hand-written test. Non-finite values (a method that failed on an image) are left out,
pairwise for the paired comparison, and `n` says how many values were used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from relprop.errors import InputError

CONFIDENCE = 0.95
# Resamples are drawn in batches of at most this many values (scipy's default draws all at once:
# 10,000 resamples of 80,000 images took 6.4 GB); the draws, and so the CI, are the same.
BOOTSTRAP_ELEMENTS = 1 << 20


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    return array[np.isfinite(array)]


def finite_mean(values: Sequence[float] | np.ndarray) -> float:
    """The mean over the finite values (NaN if there are none), without the bootstrap."""
    finite = _finite(values)
    return float(finite.mean()) if finite.size else math.nan


def _bootstrap_mean(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean; a constant sample is its own interval."""
    from scipy import stats  # deferred: scipy.stats is slow to import; only the statistics need it

    if values.size < 2:
        return math.nan, math.nan
    if np.all(values == values[0]):  # every resample is the same mean: no spread to estimate
        return float(values[0]), float(values[0])
    result = stats.bootstrap((values,), np.mean, n_resamples=n_boot, confidence_level=CONFIDENCE,
                             method="percentile", random_state=np.random.default_rng(seed),
                             vectorized=True, batch=max(1, BOOTSTRAP_ELEMENTS // values.size))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mean_sem_ci(values: Sequence[float] | np.ndarray, *, n_boot: int = 10000,
                seed: int = 0) -> tuple[float, float, float, float]:
    """(mean, standard error, CI low, CI high) over the finite values: SE = std (ddof 1) / sqrt(n),
    the CI a 95 % percentile bootstrap of the mean over images (`n_boot` resamples, seeded so a
    table is reproducible). Fewer than two values: NaN for SE and CI (no spread to estimate)."""
    from scipy import stats  # deferred: scipy.stats is slow to import; only the statistics need it

    finite = _finite(values)
    if finite.size == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = finite_mean(finite)
    sem = float(stats.sem(finite)) if finite.size > 1 else math.nan
    low, high = _bootstrap_mean(finite, n_boot, seed)
    return mean, sem, low, high


def paired_comparison(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
                      n_boot: int = 10000, seed: int = 0) -> dict[str, float]:
    """a - b on the same images: the mean difference, its 95 % paired bootstrap CI (pairs are
    resampled together) and the two-sided Wilcoxon signed-rank p-value (scipy; NaN when every
    difference is zero, where the test is undefined). Pairs with a non-finite value are left out."""
    from scipy import stats  # deferred: scipy.stats is slow to import; only the statistics need it

    a_arr = np.asarray([math.nan if v is None else v for v in a], dtype=np.float64)
    b_arr = np.asarray([math.nan if v is None else v for v in b], dtype=np.float64)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1:
        raise InputError(f"paired_comparison: a and b must be 1-D of one length, got "
                         f"{a_arr.shape} and {b_arr.shape} (pair the values by image first)")
    keep = np.isfinite(a_arr) & np.isfinite(b_arr)
    diff = a_arr[keep] - b_arr[keep]
    n = int(diff.size)
    if n == 0:
        return {"mean_diff": math.nan, "lo": math.nan, "hi": math.nan, "wilcoxon_p": math.nan, "n": 0}
    low, high = _bootstrap_mean(diff, n_boot, seed)
    p = math.nan
    if np.any(diff != 0):
        p = float(stats.wilcoxon(a_arr[keep], b_arr[keep]).pvalue)
    return {"mean_diff": float(diff.mean()), "lo": low, "hi": high, "wilcoxon_p": p, "n": n}
