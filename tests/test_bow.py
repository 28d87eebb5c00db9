"""relprop.bow: LRP for bag-of-words kernel classifiers (Bach et al. 2015, sec. 3) on synthetic
images made of textured patches, with tiny codebooks so every test is fast."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from relprop.bow import BoWModel, explain_image, load, save
from relprop.bow.codebook import Mapping
from relprop.bow.decomposition import bow_relevance
from relprop.bow.features import Grid, local_features
from relprop.bow.kernels import DECOMPOSABLE, dimension_terms, gradient, gram
from relprop.bow.pipeline import BoWConfig, BoWPipeline, export_svm, fit_images, train_svm
from relprop.bow.pooling import local_relevance, pooling_weights
from relprop.defaults import IMAGENET_MEAN, IMAGENET_STD
from relprop.errors import CheckpointError, InputError, TargetError
from relprop.methods import get_method
from relprop.methods.bow import BoWExplainer, BoWOcclusion
from relprop.models import load_model

TILE = 16


def _texture(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A 16x16 RGB tile: horizontal or vertical stripes, a checkerboard, or a blob (the signal)."""
    yy, xx = np.mgrid[0:TILE, 0:TILE]
    phase = 0
    if kind == "h":
        gray = ((yy + phase) // 2 % 2).astype(float)
    elif kind == "v":
        gray = ((xx + phase) // 2 % 2).astype(float)
    elif kind == "blob":
        gray = np.exp(-((yy - 7.5) ** 2 + (xx - 7.5) ** 2) / 18.0)
    else:  # checkerboard
        gray = (((yy + phase) // 4 + (xx + phase) // 4) % 2).astype(float)
    gray = 0.15 + 0.7 * gray + rng.normal(0, 0.01, gray.shape)
    return np.clip(np.repeat(gray[..., None], 3, axis=2), 0, 1)


def _image(rng: np.random.Generator, signal_at: int | None, tiles: int = 4) -> np.ndarray:
    """tiles x tiles background tiles (stripes, checkerboard); the signal tile at `signal_at`."""
    rows = []
    for r in range(tiles):
        row = []
        for c in range(tiles):
            kind = "blob" if signal_at == r * tiles + c else rng.choice(["h", "v"])
            row.append(_texture(kind, rng))
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)


def _dataset(n: int = 12, seed: int = 0, tiles: int = 4):
    """Class 0: background only; class 1: one signal tile at a random place."""
    rng = np.random.default_rng(seed)
    images, labels, where = [], [], []
    for i in range(n):
        at = int(rng.integers(0, tiles * tiles)) if i % 2 else None
        images.append(_image(rng, at, tiles))
        labels.append(i % 2)
        where.append(at)
    return images, np.array(labels), where


@pytest.fixture(scope="module")
def data():
    return _dataset(12)


def _fit(data, **options):
    images, labels, _ = data
    base = {"patch": 16, "stride": 8, "words": 6, "size": 64, "norm": "none", "kernel": "linear",
            "C": 10.0}
    return fit_images(images, labels, ["plain", "signal"], BoWConfig(**{**base, **options}))


def test_descriptor_support_is_exactly_the_patch():
    rng = np.random.default_rng(1)
    image = rng.random((48, 48, 3))
    descriptors, corners = local_features(image, Grid(16, 8))
    k = 7
    top, left = corners[k]
    other = rng.random((48, 48, 3))
    other[top:top + 16, left:left + 16] = image[top:top + 16, left:left + 16]
    changed, _ = local_features(other, Grid(16, 8))
    assert np.array_equal(descriptors[k], changed[k])  # only the patch's pixels matter
    assert not np.array_equal(descriptors[k - 1], changed[k - 1])  # and they do matter elsewhere
    with_colour, _ = local_features(image, Grid(16, 8), colour=True)
    assert with_colour.shape == (25, 134)
    np.testing.assert_allclose(with_colour[k, 128:131],
                               (image[top:top + 16, left:left + 16] * 255).round().mean((0, 1)), atol=1e-3)


@pytest.mark.parametrize("kernel", ["linear", "intersection", "chi2", "rbf", "exp-chi2"])
@pytest.mark.parametrize("classes", [2, 3])
def test_decision_function_equals_sklearn_svc(kernel, classes):
    rng = np.random.default_rng(2)
    x = rng.random((45, 7))
    y = np.arange(45) % classes
    ovr = train_svm(x, y, kernel, C=1.0, gamma=0.7)
    support, coef, intercept = export_svm(ovr, x, classes)
    test = rng.random((9, 7))
    ours = gram(kernel, test, support, 0.7) @ coef.T + intercept
    theirs = ovr.decision_function(gram(kernel, test, x, 0.7))
    if classes == 2:  # sklearn: one SVC, positive for class 1; ours: f_1 = that, f_0 = -that
        theirs = np.stack([-theirs, theirs], axis=1)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("kernel", DECOMPOSABLE)
def test_kernel_terms_sum_to_the_kernel(kernel):
    rng = np.random.default_rng(3)
    x, y = rng.random(6), rng.random((4, 6))
    x[0] = y[1, 0] = y[2, 0] = 0.0  # chi2's 0/0 terms
    by_hand = {"linear": x * y, "intersection": np.minimum(x, y),
               "chi2": np.where(x + y > 0, 2 * x * y / np.where(x + y > 0, x + y, 1), 0)}[kernel]
    np.testing.assert_allclose(dimension_terms(kernel, x, y), by_hand)
    np.testing.assert_allclose(dimension_terms(kernel, x, y).sum(1), gram(kernel, x[None], y)[0])


@pytest.mark.parametrize("kernel", DECOMPOSABLE)
@pytest.mark.parametrize("mapping", ["hard", "soft"])
@pytest.mark.parametrize("p", [1.0, 2.0, float("inf")])
def test_every_step_conserves_exactly(data, kernel, mapping, p):
    model = _fit(data, kernel=kernel, mapping=mapping, p=p, norm="l2" if p == 2.0 else "none")
    for image in data[0][:3]:
        for c in (0, 1):
            for bias in ("none", "uniform", "proportional"):
                e = explain_image(model, image, c, bias)
                sums = e.layer_sums()
                f = float(model.decision_images([image])[0, c])
                assert sums["f"] == pytest.approx(f, rel=1e-9)
                expected = f - (model.intercept[c] if bias == "none" else 0.0)
                scale = max(abs(expected), 1e-3)
                for layer in ("output", "bow", "local", "input"):
                    assert abs(sums[layer] - expected) <= 1e-6 * scale, (layer, sums, bias)
                assert abs(e.residual) <= 1e-6 * scale


def test_pooling_rule_zero_columns_and_ties():
    mapped = np.array([[1.0, 0.0, 0.5], [1.0, 0.0, 0.2], [0.0, 0.0, 0.5]])
    relevance = np.array([2.0, 3.0, -1.0])
    weights = pooling_weights(mapped, float("inf"))
    np.testing.assert_allclose(weights[:, 0], [0.5, 0.5, 0.0])  # tie shared
    np.testing.assert_allclose(weights[:, 1], [1 / 3] * 3)  # no hit: shared equally
    np.testing.assert_allclose(weights[:, 2], [0.5, 0.0, 0.5])
    np.testing.assert_allclose(pooling_weights(mapped, 2.0)[:, 2], [0.25, 0.04, 0.25] / np.float64(0.54))
    for p in (1.0, 3.0, float("inf")):
        assert local_relevance(mapped, relevance, p).sum() == pytest.approx(relevance.sum())


def test_linear_hard_sum_closed_form(data):
    model = _fit(data, kernel="linear", mapping="hard", p=1.0, norm="none")
    image = data[0][1]
    descriptors, _ = local_features(image, model.grid)
    words = np.argmin(((descriptors[:, None] - model.centres[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(words, minlength=len(model.centres))
    x = counts / len(words)
    for c in (0, 1):
        w = model.coef[c] @ model.support
        by_hand = w[words] / counts[words] * x[words]
        np.testing.assert_allclose(explain_image(model, image, c).local, by_hand, rtol=1e-9, atol=1e-12)


def test_one_discriminative_patch_gets_the_positive_relevance():
    images, labels, where = _dataset(24, seed=4)
    model = fit_images(images, labels, ["plain", "signal"],
                       BoWConfig(patch=16, stride=16, words=3, kernel="linear", norm="none", C=1e4))
    assert model.info["train_acc"] == 1.0
    test_images, _, test_where = _dataset(8, seed=5)
    for image, at in zip(test_images, test_where, strict=True):
        if at is None:
            continue
        pixels = explain_image(model, image, 1).pixels
        top, left = divmod(at, 4)
        inside = np.zeros_like(pixels, dtype=bool)
        inside[top * 16:(top + 1) * 16, left * 16:(left + 1) * 16] = True
        positive = np.clip(pixels, 0, None)
        assert positive[inside].sum() >= 0.95 * positive.sum()
        occlusion = BoWOcclusion(BoWModel(model, IMAGENET_MEAN, IMAGENET_STD))
        occluded = occlusion.attribute(_normalized([image]), target=1)[0, 0].numpy()
        assert inside[np.unravel_index(occluded.argmax(), occluded.shape)]


def _single_sv_model(kernel: str, gamma: float) -> BoWPipeline:
    config = BoWConfig(patch=16, stride=8, words=3, kernel=kernel, norm="none")
    support = np.array([[0.6, 0.1, 0.3]])
    return BoWPipeline(config, np.eye(3), 1.0, gamma, support, np.array([[1.0]]),
                       np.array([-0.5]), ["c"])


def test_taylor_residual_is_reported_and_bounded():
    """One RBF support vector: f(x) = -0.5 + exp(-gamma |x - s|^2). The residual must be the exact
    remainder f(x) - grad f(x0).(x - x0) and obey Taylor's bound max|g''| |x - x0|^2 / 2."""
    model = _single_sv_model("rbf", gamma=2.0)
    x = np.array([0.0, 0.9, 0.1])
    relevance, f, kept, root = bow_relevance(model, x, 0)
    assert kept == 0.0 and f < 0
    assert model.decision(root[None])[0, 0] == pytest.approx(0.0, abs=1e-9)
    residual = f - relevance.sum()
    g = lambda t: float(model.decision((root + t * (x - root))[None])[0, 0])  # noqa: E731
    step = 1e-4
    second = max(abs(g(t + step) - 2 * g(t) + g(t - step)) / step ** 2 for t in np.linspace(0, 1, 201))
    assert abs(residual) <= 0.5 * second * 1.01 + 1e-9
    assert abs(residual) > 1e-6  # a curved kernel leaves a real residual, reported not hidden
    halfway = root + 0.5 * (x - root)  # same line, same root: the remainder is second order
    half_relevance, half_f, _, half_root = bow_relevance(model, halfway, 0)
    np.testing.assert_allclose(half_root, root, atol=1e-8)
    assert abs(half_f - half_relevance.sum()) < 0.4 * abs(residual)


@pytest.mark.parametrize("kernel", ["rbf", "exp-chi2"])
def test_kernel_gradient_matches_finite_differences(kernel):
    rng = np.random.default_rng(6)
    x, y, coef = rng.random(5) + 0.1, rng.random((4, 5)), rng.normal(size=4)
    numeric = np.zeros(5)
    for d in range(5):
        e = np.zeros(5)
        e[d] = 1e-6
        numeric[d] = ((gram(kernel, (x + e)[None], y, 0.8) - gram(kernel, (x - e)[None], y, 0.8))[0] @ coef) / 2e-6
    np.testing.assert_allclose(gradient(kernel, x, y, coef, 0.8), numeric, rtol=1e-5, atol=1e-8)


def _normalized(images) -> torch.Tensor:
    x = torch.tensor(np.stack(images), dtype=torch.float32).permute(0, 3, 1, 2)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_explainer_targets_batches_and_layer_sums(data):
    model = _fit(data, kernel="chi2", mapping="soft")
    module = BoWModel(model, IMAGENET_MEAN, IMAGENET_STD)
    x = _normalized(data[0][:3])
    np.testing.assert_allclose(module(x).numpy(), model.decision_images(data[0][:3]), atol=1e-4)
    explainer = BoWExplainer(model)
    maps, sums = explainer.attribute(x, return_layer_sums=True)
    assert maps.shape == (3, 1, 64, 64)
    predicted = module(x).argmax(1)
    for i in range(3):
        reference = explain_image(model, module.images(x)[i], int(predicted[i]))
        np.testing.assert_allclose(maps[i, 0].numpy(), reference.pixels, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sums["input"], sums["output"], rtol=1e-6)
    one = explainer.attribute(x, target=1)
    listed = explainer.attribute(x, target=[1, 1, 0])
    assert torch.equal(one[:2], listed[:2]) and not torch.equal(one[2], listed[2])
    with pytest.raises(TargetError):
        explainer.attribute(x, target=[0, 1])


def test_registry_hq_and_refusals(data, resnet18_tin10):
    module = BoWModel(_fit(data), IMAGENET_MEAN, IMAGENET_STD)
    x = _normalized(data[0][:2])
    hq = get_method("bow-lrp+hq", module)
    assert hq.is_lrp and hq.attribute(x).shape == (2, 1, 64, 64)
    assert len(torch.unique(hq.attribute(x)[0])) <= 8
    with pytest.raises(InputError, match="needs a network"):
        get_method("gradcam", module)
    with pytest.raises(InputError, match="explains BoW models"):
        get_method("bow-lrp", resnet18_tin10)


def test_save_load_round_trip_and_refusals(data, tmp_path):
    model = _fit(data, kernel="intersection", mapping="soft", p=float("inf"))
    path = save(model, tmp_path / "m.bow.npz")
    loaded = load(path)
    assert loaded.config == model.config and loaded.classes == model.classes
    np.testing.assert_array_equal(loaded.decision_images(data[0][:4]), model.decision_images(data[0][:4]))
    module, info = load_model(path)
    assert isinstance(module, BoWModel) and info.classes == ["plain", "signal"] and info.preprocessing.resize == 64
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["coef"] = arrays["coef"] * 1.001  # tampered numbers, old header
    with open(tmp_path / "tampered.bow.npz", "wb") as handle:
        np.savez(handle, **arrays)
    header = json.loads(str(arrays["relprop_bow_header"]))
    header["magic"] = "other"
    arrays["relprop_bow_header"] = np.array(json.dumps(header))
    with open(tmp_path / "magic.bow.npz", "wb") as handle:
        np.savez(handle, **arrays)
    torch.save({"state_dict": {}}, tmp_path / "net.pt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("x.txt", "hello")
    for name, message in [("tampered.bow.npz", "hash mismatch"), ("magic.bow.npz", "wrong magic"),
                          ("net.pt", "not a relprop BoW"), ("other.zip", "not a relprop BoW")]:
        with pytest.raises(CheckpointError, match=message) as error:
            load(tmp_path / name)
        assert "\n" not in str(error.value)


def test_mapping_rows_are_distributions():
    rng = np.random.default_rng(7)
    descriptors, centres = rng.random((5, 4)), rng.random((3, 4))
    for kind in ("hard", "soft"):
        mapped = Mapping(kind, 0.3)(descriptors, centres)
        np.testing.assert_allclose(mapped.sum(1), 1.0)
    far = Mapping("soft", 1e-3)(descriptors * 1e3, centres)  # would underflow without the shift
    assert np.isfinite(far).all()
