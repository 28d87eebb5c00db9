"""p-means pooling of the mapped local features into one BoW vector, and its relevance rule.

x_d = (1/M sum_l m_d(l)^p)^(1/p); p = 1 is mean (sum) pooling, p = inf max pooling. The relevance of
dimension d goes to the local features in proportion to m_d(l)^p (Bach et al. 2015, sec. 3), the
winner(s) of the max for p = inf (ties shared equally). A dimension that no local feature reaches
(all m_d(l) = 0) passes its relevance to all M features equally, so that every step conserves.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.preprocessing import normalize as sk_normalize

from relprop.errors import InputError

NORMS = ("none", "l1", "l2")


def check_p(p: float) -> float:
    p = float(p)
    if not (p >= 1.0):
        raise InputError(f"pooling p={p}: must be >= 1 (or inf for max pooling)")
    return p


def pool(mapped: np.ndarray, p: float = 1.0) -> np.ndarray:
    """(M, V) mapping -> (V,) p-mean over the M local features."""
    if math.isinf(p):
        return mapped.max(axis=0)
    if p == 1.0:
        return mapped.mean(axis=0)
    return np.mean(mapped ** p, axis=0) ** (1.0 / p)


def normalize(x: np.ndarray, norm: str = "none") -> np.ndarray:
    """Optional l1/l2 normalization of BoW vectors (N, V); a zero vector stays zero."""
    if norm not in NORMS:
        raise InputError(f"norm {norm!r}: choose from {', '.join(NORMS)}")
    return x if norm == "none" else sk_normalize(x, norm=norm)


def pooling_weights(mapped: np.ndarray, p: float = 1.0) -> np.ndarray:
    """(M, V) share of each local feature in each dimension's relevance; every column sums to 1."""
    if math.isinf(p):
        weights = (mapped == mapped.max(axis=0, keepdims=True)).astype(np.float64)
    else:
        weights = mapped.astype(np.float64) ** p
    weights[:, mapped.max(axis=0) <= 0] = 1.0  # nobody hits the word: share it equally
    return weights / weights.sum(axis=0, keepdims=True)


def local_relevance(mapped: np.ndarray, bow_relevance: np.ndarray, p: float = 1.0) -> np.ndarray:
    """R_l = sum_d R_d * w_d(l): the BoW dimensions' relevance on the M local features."""
    return pooling_weights(mapped, p) @ bow_relevance
