"""ROAD's noisy linear imputation (Rong et al., ICML 2022; Quantus's `noisy_linear_imputation`).

A removed pixel must not become a constant (black, a blur) that the model reads as a shape: it is
set to the weighted mean of its 8 neighbours, 1/6 for the 4 direct ones and 1/12 for the 4
diagonal ones (renormalized over the neighbours inside the image), where removed neighbours are
themselves unknowns. That is one sparse linear system per image and removal set, solved exactly
(scipy's spsolve, as Quantus does), all channels at once. Gaussian noise of std `noise` is then
added to the imputed values only, so that the model cannot read the smoothness of the fill either.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import spsolve

from relprop.errors import InputError

# (row offset, column offset, weight): the ROAD paper's neighbourhood (Quantus's offset_weight)
NEIGHBOURS = (
    (1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12),
    (0, -1, 1 / 6), (-1, -1, 1 / 12), (1, 0, 1 / 6), (-1, 0, 1 / 6),
)
ROAD_NOISE = 0.01  # Quantus's default, in the units of the array imputed (here: the model's input)
ROAD_PERCENTAGES = tuple(range(0, 100, 10))  # 0 %, 10 %, ..., 90 % of the pixels removed


def noisy_linear_imputation(image: np.ndarray, removed: np.ndarray, noise: float = ROAD_NOISE,
                            rng: np.random.Generator | None = None) -> np.ndarray:
    """`image` (C, H, W) with the pixels `removed` (flat indices into H*W) imputed, in float64.

    `noise` > 0 needs `rng` (relprop seeds every draw; Quantus draws from numpy's global state).
    """
    channels, height, width = image.shape
    removed = np.unique(np.asarray(removed, dtype=np.int64))
    flat = np.array(image, dtype=np.float64).reshape(channels, height * width)
    if removed.size == 0:
        return flat.reshape(image.shape)
    if removed.size == height * width:
        raise InputError("ROAD cannot impute an image with every pixel removed: keep at least one")
    unknown = np.full(height * width, -1, dtype=np.int64)
    unknown[removed] = np.arange(removed.size)
    rows_, cols_ = np.divmod(removed, width)
    diagonal = np.zeros(removed.size)
    a_rows, a_cols, a_data = [], [], []
    b = np.zeros((removed.size, channels))
    for dr, dc, weight in NEIGHBOURS:
        r, c = rows_ + dr, cols_ + dc
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        diagonal[inside] += weight
        own = np.flatnonzero(inside)
        neighbour = r[inside] * width + c[inside]
        variable = unknown[neighbour]
        known = variable < 0
        b[own[known]] += weight * flat[:, neighbour[known]].T
        a_rows.append(own[~known])
        a_cols.append(variable[~known])
        a_data.append(np.full(int((~known).sum()), -weight))
    index = np.arange(removed.size)
    matrix = csc_matrix((np.concatenate([diagonal, *a_data]),
                         (np.concatenate([index, *a_rows]), np.concatenate([index, *a_cols]))),
                        shape=(removed.size, removed.size))
    # sum_n w_n * u_i - sum_{removed n} w_n * u_n = sum_{known n} w_n * x_n: u_i is the mean of its
    # neighbours; nonsingular while a pixel is kept (every removed region borders a known pixel)
    solution = spsolve(matrix, b).reshape(removed.size, channels).T
    if noise:
        if rng is None:
            raise InputError("noisy_linear_imputation: noise > 0 needs a seeded rng")
        solution = solution + noise * rng.standard_normal(solution.shape)
    flat[:, removed] = solution
    return flat.reshape(image.shape)
