"""Tie handling of every protocol (reference vs seeded random) and ROAD's noisy linear imputation,
checked against its definition by hand and against Quantus (the implementation it follows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from relprop.errors import InputError
from relprop.evaluation.metrics import RoadFrames, _Order, insertion_deletion, tie_keys
from relprop.evaluation.protocols import PROTOCOL_SPECS, PROTOCOLS, TIES, seeded
from relprop.evaluation.road import NEIGHBOURS, ROAD_PERCENTAGES, noisy_linear_imputation

ZERO, ONE = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]


class PresentPixels(nn.Module):
    """Class 0 has probability = share of `informative` pixels that are not black (2 classes)."""

    def __init__(self, informative: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("informative", informative.float())
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        present = (x[:, 0] != 0).float()
        p = (present * self.informative).sum((1, 2)) / self.informative.sum()
        p = p.clamp(1e-6, 1 - 1e-6)
        return torch.stack([p.log(), (1 - p).log()], dim=1)


def _linear(channels: int = 3, size: int = 6, classes: int = 3, seed: int = 0) -> nn.Module:
    """A tiny model whose every pixel matters (so any imputation changes its output)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, classes))
    return model.eval()


def _curves(protocol: str, heat: torch.Tensor, ties: str, seed: int = 0, ids=("img",)):
    """Insertion/deletion curves of one 6x6 map: PresentPixels for paper/rise (one informative
    pixel in four), a linear model on a random image for road."""
    if protocol == "road":
        model, x = _linear(), torch.randn(1, 3, *heat.shape, generator=torch.Generator().manual_seed(1))
    else:
        informative = torch.zeros(heat.shape)
        informative.view(-1)[::4] = 1
        model, x = PresentPixels(informative), torch.ones(1, 3, *heat.shape)
    result = insertion_deletion(model, x, heat[None], [0], protocol, mean=ZERO, std=ONE, step=2,
                                ties=ties, seed=seed, ids=list(ids))
    return np.concatenate([result.insertion_curves[0], result.deletion_curves[0]])


TIED = torch.tensor([[3.0, 3, 3, 1, 1, 1]] * 3 + [[2.0, 2, 2, 0, 0, 0]] * 3)  # four tied levels


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_random_ties_are_reproducible_for_a_seed_and_differ_for_another(protocol):
    first = _curves(protocol, TIED, "random", seed=0)
    np.testing.assert_array_equal(first, _curves(protocol, TIED, "random", seed=0))
    others = [_curves(protocol, TIED, "random", seed=s) for s in (1, 2, 3)]
    assert any(not np.array_equal(first, other) for other in others)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_map_without_ties_scores_the_same_in_both_modes(protocol):
    heat = torch.from_numpy(np.random.default_rng(3).permutation(36).reshape(6, 6).astype(np.float32))
    np.testing.assert_array_equal(_curves(protocol, heat, "reference", seed=7),  # ROAD's noise
                                  _curves(protocol, heat, "random", seed=7))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_constant_map_with_random_ties_scores_as_the_random_map_of_its_seed(protocol):
    """All pixels tie: the random mode orders them by the seed's permutation, exactly as a map
    with those (tie-free) values would be ordered; it carries no information and scores so."""
    keys = tie_keys(5, "img", 36)
    random_map = torch.from_numpy(-keys.reshape(6, 6).astype(np.float32))  # smaller key first
    np.testing.assert_array_equal(_curves(protocol, torch.ones(6, 6), "random", seed=5),
                                  _curves(protocol, random_map, "random", seed=5))
    assert not np.array_equal(_curves(protocol, torch.ones(6, 6), "random", seed=5),
                              _curves(protocol, torch.ones(6, 6), "reference", seed=5))


def test_paper_random_ties_change_exactly_step_plus_one_pixels_in_the_first_frame():
    """The reference thresholds let a whole tied level in at once; random ties take the count."""
    model = PresentPixels(torch.ones(4, 4))
    x = torch.ones(1, 3, 4, 4)
    curves = {ties: insertion_deletion(model, x, torch.ones(1, 4, 4), [0], "paper", mean=ZERO,
                                       std=ONE, step=1, ties=ties).insertion_curves[0]
              for ties in TIES}
    np.testing.assert_allclose(curves["reference"], np.ones(16), atol=1e-5)  # ties included
    np.testing.assert_allclose(curves["random"], (np.arange(16) + 2).clip(max=16) / 16, atol=1e-5)


def test_random_ties_depend_on_the_image_id_not_its_place_in_the_batch():
    informative = torch.zeros(6, 6)
    informative.view(-1)[::4] = 1
    model, x = PresentPixels(informative), torch.ones(2, 3, 6, 6)
    both = insertion_deletion(model, x, TIED[None].repeat(2, 1, 1), [0, 0], "rise", mean=ZERO,
                              std=ONE, ties="random", seed=0, ids=["a", "b"])
    alone = insertion_deletion(model, x[:1], TIED[None], [0], "rise", mean=ZERO, std=ONE,
                               ties="random", seed=0, ids=["b"])
    np.testing.assert_array_equal(both.deletion_curves[1], alone.deletion_curves[0])
    assert not np.array_equal(both.deletion_curves[0], both.deletion_curves[1])


@pytest.mark.parametrize("bad", [{"ties": "sorted"}, {"seed": -1}, {"seed": 1.5}, {"ids": ["a", "b"]}])
def test_bad_tie_options_are_one_line_errors(bad):
    with pytest.raises(InputError):
        insertion_deletion(_linear(), torch.zeros(1, 3, 6, 6), torch.zeros(1, 6, 6), [0], "rise",
                           mean=ZERO, std=ONE, **bad)


def test_the_seed_keys_only_the_protocols_it_changes():
    assert [seeded(p, "reference") for p in PROTOCOLS] == [PROTOCOL_SPECS[p].noisy for p in PROTOCOLS]
    assert all(seeded(p, "random") for p in PROTOCOLS)
    assert seeded("road", "reference") and not seeded("paper", "reference")


# ---------------------------------------------------------------- ROAD's imputation


def test_imputation_of_one_inner_pixel_is_the_weighted_mean_of_its_eight_neighbours():
    image = np.arange(9, dtype=np.float64).reshape(1, 3, 3) ** 2
    out = noisy_linear_imputation(image, [4], noise=0.0)
    direct, diagonal = image[0, [0, 1, 1, 2], [1, 0, 2, 1]], image[0, [0, 0, 2, 2], [0, 2, 0, 2]]
    assert out[0, 1, 1] == pytest.approx(direct.sum() / 6 + diagonal.sum() / 12)
    np.testing.assert_array_equal(np.delete(out.ravel(), 4), np.delete(image.ravel(), 4))


def test_imputation_at_a_corner_renormalizes_over_the_neighbours_inside():
    image = np.arange(9, dtype=np.float64).reshape(1, 3, 3) ** 2
    out = noisy_linear_imputation(image, [0], noise=0.0)
    expected = (image[0, 0, 1] / 6 + image[0, 1, 0] / 6 + image[0, 1, 1] / 12) / (5 / 12)
    assert out[0, 0, 0] == pytest.approx(expected)


def test_two_removed_neighbours_are_solved_jointly():
    """Pixels (1,0) and (1,1) of a 3x3 image: u = (known neighbours of u + w * v) / weights."""
    image = np.array([[[1.0, 2, 3], [0, 0, 5], [7, 8, 9]]])
    out = noisy_linear_imputation(image, [3, 4], noise=0.0)
    # (1,0): inside neighbours (0,0) 1/6, (2,0) 1/6, (1,1) 1/6 [unknown], (0,1) 1/12, (2,1) 1/12
    # (1,1): all 8 inside; (1,0) 1/6 unknown; known: (0,1) 2, (2,1) 8, (1,2) 5 at 1/6, corners 1/12
    a = np.array([[2 / 3, -1 / 6], [-1 / 6, 1.0]])
    b = np.array([1 / 6 + 7 / 6 + 2 / 12 + 8 / 12, (2 + 8 + 5) / 6 + (1 + 3 + 7 + 9) / 12])
    np.testing.assert_allclose(out[0, 1, :2], np.linalg.solve(a, b), rtol=1e-12)
    assert sum(w for _, _, w in NEIGHBOURS) == pytest.approx(1.0)


def test_imputation_noise_is_seeded_and_on_the_removed_pixels_only():
    image = np.random.default_rng(0).standard_normal((3, 40, 40))
    removed = np.arange(0, 1600, 3)
    clean = noisy_linear_imputation(image, removed, noise=0.0)
    noisy = noisy_linear_imputation(image, removed, 0.01, np.random.default_rng(4))
    again = noisy_linear_imputation(image, removed, 0.01, np.random.default_rng(4))
    np.testing.assert_array_equal(noisy, again)
    difference = (noisy - clean).reshape(3, -1)
    kept = np.setdiff1d(np.arange(1600), removed)
    np.testing.assert_array_equal(difference[:, kept], 0)
    assert abs(difference[:, removed].std() - 0.01) < 0.001 and abs(difference.mean()) < 0.001
    with pytest.raises(InputError):
        noisy_linear_imputation(image, removed, 0.01)  # noise without a seeded generator
    with pytest.raises(InputError):
        noisy_linear_imputation(image, np.arange(1600), 0.0)  # nothing left to impute from


def test_imputation_matches_quantus_noisy_linear_imputation():
    quantus = pytest.importorskip("quantus")
    rng = np.random.default_rng(2)
    image = rng.standard_normal((3, 12, 10))
    for removed in (rng.permutation(120)[:k] for k in (1, 30, 60, 108)):
        theirs = quantus.functions.perturb_func.noisy_linear_imputation(image, removed, noise=0.0)
        np.testing.assert_allclose(noisy_linear_imputation(image, removed, 0.0), theirs,
                                   rtol=0, atol=1e-12)


def test_road_morf_curve_matches_quantus_on_a_tiny_model():
    """Quantus's ROAD scores accuracy (prediction still the explained class) per percentage and
    broadcasts the map over channels (so it runs on one-channel images only): the same frames
    must give relprop the same 0/1 curve, image by image."""
    quantus = pytest.importorskip("quantus")
    model = _linear(channels=1, size=8, classes=4, seed=3)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    maps = torch.randn(8, 8, 8, generator=torch.Generator().manual_seed(6))  # no ties
    preds = model(x).argmax(1)
    percentages = list(ROAD_PERCENTAGES[1:])
    frames = RoadFrames(x, maps, _Order("reference", 0, [str(i) for i in range(8)]), percentages,
                        noise=0.0)
    ours, theirs = [], []
    for i in range(8):
        with torch.no_grad():
            kept = model(frames.make(i, "deletion", torch.arange(len(percentages)))).argmax(1)
        ours.append((kept == preds[i]).int().tolist())
        metric = quantus.ROAD(percentages=percentages, noise=0.0, normalise=False, abs=False,
                              disable_warnings=True)
        metric(model=model, x_batch=x[i:i + 1].numpy(), y_batch=preds[i:i + 1].numpy(),
               a_batch=maps[i:i + 1, None].numpy(), device="cpu")
        theirs.append([int(metric.evaluation_scores[p]) for p in percentages])
    assert ours == theirs
    assert 0 < np.mean(ours) < 1  # the model's prediction does flip: the comparison can fail


def test_road_frames_start_at_the_image_and_remove_the_ranked_pixels():
    model, x = _linear(), torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    heat = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 6, 6)).astype(np.float32))
    result = insertion_deletion(model, x, heat, None, "road", mean=ZERO, std=ONE, ids=["a", "b"])
    p0 = torch.softmax(model(x), 1).max(1).values.detach().numpy()
    np.testing.assert_allclose(result.insertion_curves[:, 0], p0, rtol=1e-6)
    np.testing.assert_allclose(result.deletion_curves[:, 0], p0, rtol=1e-6)
    assert result.insertion_curves.shape == (2, len(ROAD_PERCENTAGES))
    frames = RoadFrames(x, heat, _Order("reference", 0, ["a", "b"]))
    top = np.argsort(-heat[1].numpy().ravel(), kind="stable")
    np.testing.assert_array_equal(frames.removed(1, "deletion", 50), top[:18])  # MoRF: the top
    np.testing.assert_array_equal(frames.removed(1, "insertion", 50), top[18:])  # LeRF: the rest
    frame = frames.make(1, "deletion", torch.tensor([5]))[0].numpy().reshape(3, -1)
    np.testing.assert_array_equal(frame[:, top[18:]], x[1].numpy().reshape(3, -1)[:, top[18:]])
    assert not np.allclose(frame[:, top[:18]], x[1].numpy().reshape(3, -1)[:, top[:18]])
    other = insertion_deletion(model, x, heat, None, "road", mean=ZERO, std=ONE, ids=["a", "b"],
                               seed=1)
    assert not np.array_equal(result.deletion_curves, other.deletion_curves)  # the noise is seeded
