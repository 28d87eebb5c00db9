"""Visual words (a k-means codebook) and the mapping m(l) in R^V of a local feature l."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import softmax
from sklearn.cluster import MiniBatchKMeans
from sklearn.metrics.pairwise import euclidean_distances

from relprop.errors import InputError

MAPPINGS = ("hard", "soft")


def fit_codebook(descriptors: np.ndarray, words: int, seed: int = 0) -> np.ndarray:
    """(V, D) centres of `MiniBatchKMeans` on a sample of local descriptors."""
    if len(descriptors) < words:
        raise InputError(f"{len(descriptors)} local features cannot make a codebook of {words} words")
    kmeans = MiniBatchKMeans(n_clusters=words, random_state=seed, batch_size=4096, n_init=3)
    return kmeans.fit(descriptors).cluster_centers_.astype(np.float64)


def default_sigma(descriptors: np.ndarray, centres: np.ndarray) -> float:
    """Kernel-codebook width: the median distance of a feature to its nearest word."""
    distances = euclidean_distances(descriptors, centres).min(axis=1)
    return float(max(np.median(distances), 1e-6))


@dataclass(frozen=True)
class Mapping:
    """Hard: one-hot of the nearest word. Soft: Gaussian kernel codebook (van Gemert et al. 2008),
    m_d(l) = exp(-|l - c_d|^2 / 2 sigma^2) / sum_d' exp(-|l - c_d'|^2 / 2 sigma^2)."""

    kind: str = "hard"
    sigma: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in MAPPINGS:
            raise InputError(f"mapping {self.kind!r}: choose from {', '.join(MAPPINGS)}")

    def __call__(self, descriptors: np.ndarray, centres: np.ndarray) -> np.ndarray:
        """(M, V) non-negative mapping of M descriptors; each row sums to 1."""
        squared = euclidean_distances(descriptors, centres, squared=True)
        if self.kind == "hard":  # (not pairwise_distances_argmin: its OpenMP reduction stalls
            return np.eye(len(centres))[squared.argmin(axis=1)]  # for seconds on a busy machine)
        return softmax(-squared / (2.0 * self.sigma ** 2), axis=1)  # stable: shifts by the row max
