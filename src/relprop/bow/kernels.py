"""The SVM kernels on BoW vectors, as sklearn computes them, and their per-dimension terms.

Sum-decomposable kernels k(x, x') = sum_d k_d(x_d, x'_d): `linear` (x x'), `intersection`
(min(x, x')) and `chi2` (2 x x' / (x + x'), the positive-definite additive chi2 kernel; sklearn's
`additive_chi2_kernel` is its conditionally-definite variant -sum (x-x')^2/(x+x'), and
k = (sum x + sum x')/2 + additive_chi2/2). Non-decomposable, differentiable: `rbf`
(exp(-gamma |x-x'|^2)) and `exp-chi2` (sklearn's `chi2_kernel`, exp(-gamma sum (x-x')^2/(x+x'))).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics.pairwise import (
    additive_chi2_kernel,
    chi2_kernel,
    euclidean_distances,
    linear_kernel,
    rbf_kernel,
)

from relprop.errors import InputError

DECOMPOSABLE = ("linear", "intersection", "chi2")
KERNELS = (*DECOMPOSABLE, "rbf", "exp-chi2")
_CHUNK = 256


def check_kernel(kind: str) -> str:
    if kind not in KERNELS:
        raise InputError(f"kernel {kind!r}: choose from {', '.join(KERNELS)}")
    return kind


def gram(kind: str, x: np.ndarray, y: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """(N, S) kernel matrix between BoW vectors x (N, V) and y (S, V)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if kind == "linear":
        return linear_kernel(x, y)
    if kind == "chi2":
        return 0.5 * (x.sum(1)[:, None] + y.sum(1)[None]) + 0.5 * additive_chi2_kernel(x, y)
    if kind == "rbf":
        return rbf_kernel(x, y, gamma=gamma)
    if kind == "exp-chi2":
        return chi2_kernel(x, y, gamma=gamma)
    if kind == "intersection":  # sklearn has no histogram intersection kernel
        return np.vstack([np.minimum(x[i:i + _CHUNK, None], y[None]).sum(-1)
                          for i in range(0, len(x), _CHUNK)]) if len(x) else np.zeros((0, len(y)))
    raise InputError(f"kernel {kind!r}: choose from {', '.join(KERNELS)}")


def dimension_terms(kind: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(S, V) terms k_d(x_d, y_sd) of a decomposable kernel for one x (V,); rows sum to k(x, y_s)."""
    x, y = np.asarray(x, dtype=np.float64)[None], np.asarray(y, dtype=np.float64)
    if kind == "linear":
        return x * y
    if kind == "intersection":
        return np.minimum(x, y)
    if kind == "chi2":
        total = x + y
        return np.divide(2.0 * x * y, total, out=np.zeros_like(total), where=total > 0)
    raise InputError(f"kernel {kind!r} is not sum-decomposable; decomposable: {', '.join(DECOMPOSABLE)}")


def gradient(kind: str, x: np.ndarray, y: np.ndarray, coef: np.ndarray, gamma: float) -> np.ndarray:
    """(V,) gradient at x of sum_s coef_s k(x, y_s), for the non-decomposable kernels."""
    x = np.asarray(x, dtype=np.float64)
    values = gram(kind, x[None], y, gamma)[0] * coef  # (S,)
    diff = x[None] - y
    if kind == "rbf":
        return -2.0 * gamma * values @ diff
    if kind == "exp-chi2":
        total = x[None] + y
        # d/dx of (x - y)^2 / (x + y) = (x - y)(x + 3y) / (x + y)^2; its right limit at x = y = 0 is 1
        inner = np.divide(diff * (x[None] + 3.0 * y), total ** 2, out=np.ones_like(total),
                          where=total > 0)
        return -gamma * values @ inner
    raise InputError(f"kernel {kind!r} has an exact decomposition; no gradient needed")


def default_gamma(kind: str, x: np.ndarray) -> float:
    """1 / mean squared distance (rbf) or mean chi2 distance (exp-chi2) between training vectors."""
    sample = np.asarray(x[:1000], dtype=np.float64)
    if kind == "rbf":
        mean = float(euclidean_distances(sample, squared=True).mean())
    elif kind == "exp-chi2":
        mean = float(-additive_chi2_kernel(sample).mean())
    else:
        return 1.0
    return 1.0 / mean if mean > 0 else 1.0
