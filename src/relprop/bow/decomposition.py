"""LRP for the BoW kernel classifier (Bach et al., PLOS ONE 2015, section 3), layer by layer.

classifier -> BoW dimensions (exact for sum-decomposable kernels, first-order Taylor at a root point
otherwise) -> local features (pooling rule, `pooling.local_relevance`) -> pixels (each local feature's
relevance spread uniformly over its patch; overlapping patches add up).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from relprop.bow.kernels import DECOMPOSABLE, dimension_terms, gradient
from relprop.bow.pipeline import BoWPipeline, Encoded
from relprop.bow.pooling import local_relevance
from relprop.errors import InputError

BIAS_POLICIES = ("none", "uniform", "proportional")
_BISECTIONS = 60


@dataclass
class Explanation:
    """One image's relevance at every layer, and the conservation report."""

    f: float  # f_c(x)
    bias_kept: float  # the part of b_c the policy keeps out of the decomposition
    bow: np.ndarray  # (V,) R_d
    local: np.ndarray  # (M,) R_l
    pixels: np.ndarray  # (H, W)
    root: np.ndarray | None = None  # Taylor root point (rbf, exp-chi2)

    @property
    def residual(self) -> float:
        """f(x) - b_kept - sum_d R_d: zero for decomposable kernels, the Taylor error otherwise."""
        return self.f - self.bias_kept - float(self.bow.sum())

    def layer_sums(self) -> dict[str, float]:
        """`output` is the relevance to conserve: f(x) less the bias the policy keeps out."""
        return {"output": self.f - self.bias_kept, "bow": float(self.bow.sum()),
                "local": float(self.local.sum()), "input": float(self.pixels.sum()),
                "f": self.f, "bias": self.bias_kept, "residual": self.residual}


def bow_relevance(model: BoWPipeline, x: np.ndarray, c: int,
                  bias: str = "none") -> tuple[np.ndarray, float, float, np.ndarray | None]:
    """(R (V,), f_c(x), bias kept out, root point or None) for class c at BoW vector x."""
    if bias not in BIAS_POLICIES:
        raise InputError(f"bias policy {bias!r}: choose from {', '.join(BIAS_POLICIES)}")
    f = float(model.decision(x[None])[0, c])
    b = float(model.intercept[c])
    if model.config.kernel not in DECOMPOSABLE:
        relevance, root = taylor_relevance(model, x, c)
        return relevance, f, 0.0, root
    relevance = model.coef[c] @ dimension_terms(model.config.kernel, x, model.support)
    return _share_bias(relevance, b, bias), f, (b if bias == "none" else 0.0), None


def _share_bias(relevance: np.ndarray, b: float, bias: str) -> np.ndarray:
    """none: b stays out; uniform: b / V each; proportional: in proportion to |R_d|."""
    if bias == "none":
        return relevance
    magnitude = np.abs(relevance)
    if bias == "uniform" or magnitude.sum() == 0:
        return relevance + b / len(relevance)
    return relevance + b * magnitude / magnitude.sum()


def taylor_relevance(model: BoWPipeline, x: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """R_d = df_c/dx_d(x0) (x_d - x0_d) at a root point x0 (f_c(x0) ~ 0) on the segment from x to the
    nearest support vector on the other side of the decision boundary (bisection). Without such a
    vector, x0 is that vector with the smallest |f_c|; f_c(x0) then shows in the residual."""
    f = lambda z: float(model.decision(z[None])[0, c])  # noqa: E731
    fx = f(x)
    if fx == 0.0:
        return np.zeros_like(x), x.copy()
    scores = model.decision(model.support)[:, c]
    other = np.flatnonzero(np.sign(scores) != np.sign(fx))
    if len(other) == 0:
        root = model.support[int(np.argmin(np.abs(scores)))].copy()
    else:
        distances = ((model.support[other] - x) ** 2).sum(axis=1)
        far = model.support[other[int(np.argmin(distances))]]
        near_t, far_t = 0.0, 1.0
        for _ in range(_BISECTIONS):
            mid = 0.5 * (near_t + far_t)
            if np.sign(f(x + mid * (far - x))) == np.sign(fx):
                near_t = mid
            else:
                far_t = mid
        root = x + far_t * (far - x)
    grad = gradient(model.config.kernel, root, model.support, model.coef[c], model.gamma)
    return grad * (x - root), root


def spread_to_pixels(encoded: Encoded, relevance: np.ndarray, patch: int,
                     shape: tuple[int, int]) -> np.ndarray:
    """Each local feature's relevance uniformly over its patch; overlapping patches accumulate."""
    pixels = np.zeros(shape, dtype=np.float64)
    per_pixel = relevance / float(patch * patch)
    for (top, left), value in zip(encoded.corners, per_pixel, strict=True):
        pixels[top:top + patch, left:left + patch] += value
    return pixels


def explain_image(model: BoWPipeline, image: np.ndarray, c: int, bias: str = "none") -> Explanation:
    """Relevance of class c for one (H, W, 3) float RGB image, at every layer."""
    encoded = model.encode(image)
    bow, f, kept, root = bow_relevance(model, encoded.x, c, bias)
    local = local_relevance(encoded.mapped, bow, model.config.p)
    pixels = spread_to_pixels(encoded, local, model.config.patch, image.shape[:2])
    return Explanation(f, kept, bow, local, pixels, root)


def occlusion_map(model: BoWPipeline, image: np.ndarray, c: int) -> np.ndarray:
    """The model-agnostic check of `explain_image`: f_c(x) - f_c(x with one patch set to the
    image's mean colour), per patch of the model's grid; a pixel gets the mean over the patches
    that cover it. (H, W) for one (H, W, 3) float RGB image."""
    patch = model.config.patch
    corners = model.grid.positions(*image.shape[:2])
    colour = image.reshape(-1, 3).mean(axis=0)
    occluded = []
    for top, left in corners:
        copy = image.copy()
        copy[top:top + patch, left:left + patch] = colour
        occluded.append(copy)
    drops = model.decision_images([image])[0, c] - model.decision_images(occluded)[:, c]
    total, cover = np.zeros(image.shape[:2]), np.zeros(image.shape[:2])
    for (top, left), drop in zip(corners, drops, strict=True):
        total[top:top + patch, left:left + patch] += drop
        cover[top:top + patch, left:left + patch] += 1
    return np.divide(total, cover, out=np.zeros_like(total), where=cover > 0)
