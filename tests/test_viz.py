"""Colours mean what the legend says: red positive, blue negative, zero shows the photo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from relprop.viz import (
    PanelRow,
    blend,
    denormalize,
    heat_2d,
    heat_scale,
    render_map,
    resize_map,
    save_overlay,
    save_panel,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photo(h: int = 40, w: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(60, 200, size=(h, w, 3), dtype=np.uint8)


def _signed_map(h: int = 40, w: int = 40) -> np.ndarray:
    heat = np.zeros((h, w), np.float32)
    heat[:, : w // 3] = 1.0  # left: positive
    heat[:, -w // 3:] = -1.0  # right: negative, middle: zero
    return heat


def _is_grey(rgb: np.ndarray) -> np.ndarray:
    return (np.ptp(rgb.astype(int), axis=-1) <= 1)


def test_heat_2d_sums_channels_and_clears_nan() -> None:
    maps = np.stack([np.full((4, 5), 1.0), np.full((4, 5), 2.0), np.full((4, 5), -0.5)])
    np.testing.assert_allclose(heat_2d(maps), np.full((4, 5), 2.5))
    assert heat_2d(np.array([[np.nan, 1.0]])).tolist() == [[0.0, 1.0]]
    with pytest.raises(ValueError, match="shape"):
        heat_2d(np.zeros((1, 1, 2, 2)))


def test_scale_is_symmetric_for_signed_maps_and_from_zero_otherwise() -> None:
    scale = heat_scale(np.array([[-3.0, 1.0], [0.5, 2.0]]))
    assert scale.signed and scale.vmin == -scale.vmax and 2.0 < scale.vmax <= 3.0
    positive = heat_scale(np.array([[-3.0, 1.0], [0.5, 2.0]]), sign="positive")
    assert not positive.signed and positive.vmin == 0.0 and positive.vmax <= 2.0
    cam = heat_scale(np.array([[0.0, 0.2], [0.4, 1.0]]))
    assert not cam.signed and cam.vmin == 0.0
    assert heat_scale(np.zeros((3, 3))).vmax == 1.0


def test_one_hot_pixel_does_not_wash_out_the_map() -> None:
    heat = np.full((100, 100), 0.1, np.float32)
    heat[0, 0] = 1000.0
    assert heat_scale(heat).vmax < 1.0


def test_blend_colours_sign_and_leaves_zero_grey() -> None:
    photo, heat = _photo(), _signed_map()
    out = blend(photo, heat, heat_scale(heat))
    left, middle, right = out[:, :10].astype(int), out[:, 18:22], out[:, -10:].astype(int)
    assert (left[..., 0] > left[..., 2] + 60).all()  # positive: red
    assert (right[..., 2] > right[..., 0] + 60).all()  # negative: blue
    assert _is_grey(middle).all()  # zero: the faded photo, no colour
    grey = photo[:, 18:22].astype(np.float32).mean(-1)
    assert np.corrcoef(grey.ravel(), middle[..., 0].astype(float).ravel())[0, 1] > 0.99


def test_sign_positive_drops_negative_relevance() -> None:
    photo, heat = _photo(), _signed_map()
    out = render_map(photo, heat, sign="positive")
    assert _is_grey(out[:, -10:]).all()
    red = out[:, :10].astype(int)
    assert (red[..., 0] > red[..., 2] + 40).all()


def test_coarse_maps_are_resized_to_the_image() -> None:
    coarse = np.arange(4, dtype=np.float32).reshape(2, 2)
    fine = resize_map(coarse, (8, 10))
    assert fine.shape == (8, 10) and fine[0, 0] < fine[-1, -1]
    assert render_map(_photo(8, 10), coarse).shape == (8, 10, 3)


def test_denormalize_inverts_normalize() -> None:
    rgb = _photo(6, 7)
    x = (rgb.transpose(2, 0, 1) / 255.0 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    np.testing.assert_array_equal(denormalize(x, MEAN, STD), rgb)


def _colours(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)


def _blue_pixels(colours: np.ndarray) -> int:
    return int((colours[:, 2] > colours[:, 0] + 80).sum())


def test_overlay_png_has_the_map_and_a_colour_bar(tmp_path: Path) -> None:
    photo, heat = _photo(), _signed_map()
    signed = _colours(save_overlay(tmp_path / "signed.png", photo, heat, title="ours"))
    positive = _colours(save_overlay(tmp_path / "pos.png", photo, heat, sign="positive"))
    width, height = Image.open(tmp_path / "signed.png").size
    assert width > height  # the colour bar sits beside the map
    assert _blue_pixels(signed) > 500 and _blue_pixels(positive) < 20


def test_panel_has_a_column_per_method_and_a_row_per_image(tmp_path: Path) -> None:
    photo, heat = _photo(), _signed_map()
    row = PanelRow(photo, "a.jpg\nkoala 93%", {"ours": heat, "gradcam": np.abs(heat)})
    wide = PanelRow(_photo(30, 60), "b.jpg", {"ours": heat[:30], "ig": -heat[:30],
                                               "gradcam": heat[:30]})
    one = Image.open(save_panel(tmp_path / "one.png", [row])).size
    two = Image.open(save_panel(tmp_path / "two.png", [row, wide])).size
    assert two[0] > one[0] * 1.2  # the union of methods: ours, gradcam, ig
    assert two[1] > one[1] * 1.3


def test_a_map_that_draws_nothing_says_so_on_the_figure(tmp_path: Path, monkeypatch) -> None:
    """An all-zero map (Grad-CAM of a class with no positive evidence, e.g. `--target koala` on a
    penguin) would show as the plain photo: the panel cell and the overlay say so in words."""
    from matplotlib.axes import Axes

    from relprop.viz import empty_note

    written: list[str] = []
    original = Axes.text
    monkeypatch.setattr(Axes, "text", lambda ax, x, y, s, *a, **k: written.append(s) or original(ax, x, y, s, *a, **k))
    image = np.full((16, 16, 3), 128, np.uint8)
    zero, negative, some = np.zeros((16, 16)), -np.ones((16, 16)), np.eye(16)
    save_panel(tmp_path / "p.png", [PanelRow(image, "a", {"gradcam": zero, "ours": some})])
    assert written == ["map is zero everywhere"]
    save_overlay(tmp_path / "o.png", image, negative, sign="positive")
    assert written[1:] == ["no positive relevance"]
    save_overlay(tmp_path / "o.png", image, negative)
    assert len(written) == 2 and empty_note(some) is None and empty_note(negative) is None
