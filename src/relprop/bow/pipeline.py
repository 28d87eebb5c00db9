"""The fitted BoW pipeline: local features -> codebook mapping -> p-means pooling -> kernel SVM.

f_c(x) = b_c + sum_i alpha_ic k(x, x_i) per class c (one-vs-rest), evaluated from plain arrays
(codebook centres, support vectors, dual coefficients, intercepts) so that a saved pipeline needs
no pickled sklearn object; `fit` trains with sklearn (`MiniBatchKMeans`, `OneVsRestClassifier(SVC(
kernel="precomputed"))`) and exports those arrays.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.multiclass import OneVsRestClassifier
from sklearn.svm import SVC
from torchvision import transforms

from relprop.bow.codebook import Mapping, default_sigma, fit_codebook
from relprop.bow.features import Grid, local_features
from relprop.bow.kernels import check_kernel, default_gamma, gram
from relprop.bow.pooling import check_p, normalize, pool
from relprop.data import discover, select
from relprop.errors import ImageError, InputError
from relprop.images import MAX_INPUT_PIXELS, BoundedTransform, load_image


@dataclass
class BoWConfig:
    """Every choice of the pipeline (the defaults fit tin10 train in a few minutes on 2 cores)."""

    patch: int = 16
    stride: int = 8
    colour: bool = False
    words: int = 200
    mapping: str = "hard"
    sigma: float | None = None  # soft mapping width; None: median distance to the nearest word
    p: float = 1.0
    norm: str = "l1"
    kernel: str = "chi2"
    C: float = 1.0
    gamma: float | None = None  # rbf / exp-chi2; None: 1 / mean distance between training vectors
    size: int = 64  # images are resized (shorter side) to this before feature extraction
    seed: int = 0
    max_descriptors: int = 100_000  # k-means sample

    def check(self) -> BoWConfig:
        Grid(self.patch, self.stride)
        Mapping(self.mapping)
        check_kernel(self.kernel)
        self.p = check_p(self.p)
        normalize(np.zeros((1, 1)), self.norm)
        if self.words < 2 or self.size < self.patch:
            raise InputError(f"words {self.words} must be >= 2, size {self.size} >= patch {self.patch}")
        if not (math.isfinite(self.C) and self.C > 0):
            raise InputError(f"--C {self.C}: must be a finite number above 0")
        if self.size * self.size > MAX_INPUT_PIXELS:
            raise InputError(f"--size {self.size}: every image would be at least {self.size}x{self.size} "
                             f"pixels, above the input limit of {MAX_INPUT_PIXELS:,} (--size <= "
                             f"{math.isqrt(MAX_INPUT_PIXELS)})")
        for name in ("sigma", "gamma"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InputError(f"--{name} {value}: must be a finite number above 0 (or left out)")
        return self


@dataclass
class Encoded:
    """One image through the feature layers: what the decomposition walks back through."""

    corners: np.ndarray  # (M, 2) patch top-left corners
    mapped: np.ndarray  # (M, V) m(l)
    x: np.ndarray  # (V,) BoW vector as the SVM sees it (pooled, normalized)


@dataclass
class BoWPipeline:
    config: BoWConfig
    centres: np.ndarray  # (V, D)
    sigma: float
    gamma: float
    support: np.ndarray  # (S, V) training BoW vectors that are support vectors of some class
    coef: np.ndarray  # (C, S) alpha_ic y_ic (zero where x_i is no support vector of class c)
    intercept: np.ndarray  # (C,)
    classes: list[str]
    info: dict[str, Any] = field(default_factory=dict)  # val_acc, training counts, ...

    @property
    def grid(self) -> Grid:
        return Grid(self.config.patch, self.config.stride)

    @property
    def mapping(self) -> Mapping:
        return Mapping(self.config.mapping, self.sigma)

    def encode(self, image: np.ndarray) -> Encoded:
        """(H, W, 3) float RGB in [0, 1] -> local features' supports, mapping and BoW vector."""
        descriptors, corners = local_features(image, self.grid, self.config.colour)
        mapped = self.mapping(descriptors, self.centres)
        x = normalize(pool(mapped, self.config.p)[None], self.config.norm)[0]
        return Encoded(corners, mapped, x)

    def bow(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, V) BoW vectors."""
        return np.stack([self.encode(image).x for image in images]) if len(images) else \
            np.zeros((0, len(self.centres)))

    def decision(self, x: np.ndarray) -> np.ndarray:
        """(N, C) decision values f_c(x) of BoW vectors (N, V)."""
        return gram(self.config.kernel, x, self.support, self.gamma) @ self.coef.T + self.intercept

    def decision_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.decision(self.bow(images))


def train_svm(x: np.ndarray, y: np.ndarray, kernel: str, C: float, gamma: float) -> Any:
    """sklearn's one-vs-rest SVC on the precomputed kernel of the training BoW vectors."""
    return OneVsRestClassifier(SVC(kernel="precomputed", C=C)).fit(gram(kernel, x, x, gamma), y)


def export_svm(ovr: Any, x: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(support vectors (S, V), coefficients (C, S), intercepts (C,)) of a fitted one-vs-rest SVC."""
    used = np.unique(np.concatenate([est.support_ for est in ovr.estimators_]))
    position = {int(i): k for k, i in enumerate(used)}
    coef = np.zeros((num_classes, len(used)))
    intercept = np.zeros(num_classes)
    for c, est in enumerate(ovr.estimators_):
        columns = [position[int(i)] for i in est.support_]
        coef[c, columns] = est.dual_coef_[0]
        intercept[c] = est.intercept_[0]
    if num_classes == 2 and len(ovr.estimators_) == 1:  # sklearn fits one SVC for class 1 vs 0
        coef[1], intercept[1] = coef[0], intercept[0]
        coef[0], intercept[0] = -coef[1], -intercept[1]
    return x[used].astype(np.float64), coef, intercept


def load_folder(folder: str | Path, size: int, per_class: int | None = None,
                classes: Sequence[str] | None = None) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Images of a class-folder tree as (H, W, 3) floats in [0, 1], resized as the model sees them."""
    dataset = discover(folder, classes)
    items = select(dataset.items, per_class)
    if not items:
        raise InputError(f"{folder}: no labelled images (expected one folder per class)")
    names = list(classes) if classes is not None else sorted({Path(it.path).parts[0] for it in items})
    transform = BoundedTransform(transforms.Compose([transforms.Resize(size), transforms.ToTensor()]),
                                 size)  # the input bound of explain and evaluate
    images, labels = [], []
    for item in items:  # an unreadable or oversized file is named and skipped; the others are used
        path = dataset.root / item.path
        try:
            images.append(transform(load_image(path)).permute(1, 2, 0).numpy())
            labels.append(item.label)
        except ImageError as error:
            text = str(error)
            print(f"relprop fit-bow: skipping {text if text.startswith(str(path)) else f'{path}: {text}'}",
                  file=sys.stderr)
    return images, np.array(labels, dtype=np.int64), names


def fit(image_folder: str | Path, config: BoWConfig | None = None, *, per_class: int | None = None,
        val_folder: str | Path | None = None, verbose: bool = True) -> BoWPipeline:
    """Fit the whole pipeline on a class-folder tree (e.g. tin10/train); optionally score `val_folder`."""
    config = (config or BoWConfig()).check()
    images, labels, classes = load_folder(image_folder, config.size, per_class)
    _check_training_set(image_folder, labels, classes)
    model = fit_images(images, labels, classes, config, verbose=verbose)
    if val_folder is not None:
        val_images, val_labels, _ = load_folder(val_folder, config.size, classes=classes)
        if not val_images:
            raise InputError(f"--val {val_folder}: no readable image (each named above)")
        model.info["val_acc"] = float((model.decision_images(val_images).argmax(1) == val_labels).mean())
        model.info["val_images"] = len(val_images)
    _say(verbose, ", ".join(f"{k} {v:.3f}" for k, v in model.info.items() if k.endswith("acc")))
    return model


def _check_training_set(folder: str | Path, labels: np.ndarray, classes: Sequence[str]) -> None:
    """An SVM per class needs images of at least two classes, and every class's own images: a class
    with none would shift every later class's coefficients onto the wrong name."""
    if len(labels) == 0:
        raise InputError(f"{folder}: no readable training image (each named above)")
    missing = [name for index, name in enumerate(classes) if not (labels == index).any()]
    if missing:
        raise InputError(f"{folder}: class {missing[0]!r} has no readable training image"
                         + (f" (nor {len(missing) - 1} other(s))" if len(missing) > 1 else ""))
    if len(classes) < 2:
        raise InputError(f"{folder}: one class ({classes[0]!r}); a classifier needs at least two "
                         "class folders")


def fit_images(images: Sequence[np.ndarray], labels: np.ndarray, classes: Sequence[str],
               config: BoWConfig | None = None, *, verbose: bool = False) -> BoWPipeline:
    """Fit on (H, W, 3) float RGB images in [0, 1] with class indices `labels`."""
    config = (config or BoWConfig()).check()
    labels = np.asarray(labels)
    _check_training_set("training images", labels, classes)
    _say(verbose, f"{len(images)} images, {len(classes)} classes; local features ...")
    grid = Grid(config.patch, config.stride)
    descriptors = [local_features(image, grid, config.colour)[0] for image in images]
    pooled = np.vstack(descriptors)
    rng = np.random.default_rng(config.seed)
    sample = pooled[rng.permutation(len(pooled))[: config.max_descriptors]]
    _say(verbose, f"{len(pooled)} local features; k-means on {len(sample)} -> {config.words} words ...")
    centres = fit_codebook(sample, config.words, config.seed)
    sigma = config.sigma or default_sigma(sample[:5000], centres)
    mapping = Mapping(config.mapping, sigma)
    x = normalize(np.stack([pool(mapping(d, centres), config.p) for d in descriptors]), config.norm)
    gamma = config.gamma or default_gamma(config.kernel, x)
    _say(verbose, f"SVM ({config.kernel} kernel, one-vs-rest) on {len(x)} BoW vectors ...")
    ovr = train_svm(x, labels, config.kernel, config.C, gamma)
    support, coef, intercept = export_svm(ovr, x, len(classes))
    model = BoWPipeline(config, centres, float(sigma), float(gamma), support, coef, intercept,
                        list(classes), {"train_images": len(images)})
    model.info["support_vectors"] = len(support)
    model.info["train_acc"] = float((model.decision(x).argmax(1) == labels).mean())
    return model


def _say(verbose: bool, text: str) -> None:
    if verbose:
        print(f"relprop fit-bow: {text}", file=sys.stderr)


def config_dict(config: BoWConfig) -> dict[str, Any]:
    values = asdict(config)
    values["p"] = "inf" if np.isinf(values["p"]) else values["p"]
    return values


def config_from_dict(values: dict[str, Any]) -> BoWConfig:
    known = {k: v for k, v in values.items() if k in BoWConfig.__dataclass_fields__}
    if known.get("p") == "inf":
        known["p"] = float("inf")
    return BoWConfig(**known).check()
