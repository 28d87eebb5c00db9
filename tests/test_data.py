"""Dataset layouts (class folders, tin10 boxes, CUB test split) and boxes mapped to the input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from relprop.data import Item, discover, load_item, select
from relprop.errors import InputError
from relprop.models import Preprocessing, preprocessing

from sharedfiles import shared_path

TIN10_CLASSES = ["n01443537", "n01882714", "n02056570", "n02165456", "n02279972", "n04146614",
                 "n04285008", "n04398044", "n04507155", "n07749582"]


def test_tin10_val_layout_with_boxes():
    root = shared_path("data", "tin10", "val")
    data = discover(root, TIN10_CLASSES[::-1])  # the model's order decides the label
    assert data.layout == "tin10" and len(data.items) == 250
    first = data.items[0]
    assert first == Item("n01443537/val_1230.JPEG", 9, (0.0, 3.0, 64.0, 64.0))  # inclusive 0 3 63 63
    assert all(it.box is not None for it in data.items)
    assert [it.path for it in data.items[:2]] == ["n01443537/val_1230.JPEG", "n01443537/val_1284.JPEG"]


def test_boxes_are_scaled_to_the_model_input():
    root = shared_path("data", "tin10", "val")
    spec = Preprocessing(resize=112, crop=None, mean=[0.0] * 3, std=[1.0] * 3)
    _, box = load_item(root, Item("n01443537/val_1230.JPEG", 0, (0.0, 3.0, 64.0, 64.0)),
                       preprocessing(spec), spec)
    assert box == pytest.approx((0.0, 5.25, 112.0, 112.0))


def _write(path, size, box=None):
    """An image, black except a white rectangle (x0, y0, x1, y1 exclusive)."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    if box:
        pixels[box[1]:box[3], box[0]:box[2]] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_scale_box_follows_resize_and_center_crop(tmp_path):
    spec = Preprocessing(resize=256, crop=224, mean=[0.0] * 3, std=[1.0] * 3)
    box = (300, 100, 420, 250)
    _write(tmp_path / "a.png", (500, 375), box)
    x, scaled = load_item(tmp_path, Item("a.png", 0, box), preprocessing(spec), spec)
    bright = np.argwhere(x[0].numpy() > 0.5)  # where the white rectangle landed
    (y0, x0), (y1, x1) = bright.min(0), bright.max(0) + 1
    assert scaled == pytest.approx((x0, y0, x1, y1), abs=1.0)


def test_image_folder_layout_without_boxes(tmp_path):
    for name in ("cat/1.png", "cat/2.jpg", "dog/3.png", "ant/4.png"):
        _write(tmp_path / name, (8, 8))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    data = discover(tmp_path)
    assert data.layout == "imagefolder"
    assert [(it.path, it.label, it.box) for it in data.items] == [
        ("ant/4.png", 0, None), ("cat/1.png", 1, None), ("cat/2.jpg", 1, None), ("dog/3.png", 2, None)]
    assert [it.path for it in select(data.items, per_class=1)] == ["ant/4.png", "cat/1.png", "dog/3.png"]
    assert len(select(data.items, limit=2)) == 2


def test_cub_layout_uses_the_test_split(tmp_path):
    rows = [("1", "001.Albatross/a.jpg", "1", "1", "2 3 10 20"),
            ("2", "001.Albatross/b.jpg", "0", "1", "0 0 5 5"),
            ("3", "002.Auklet/c.jpg", "0", "2", "1.5 2 4 6")]
    files = {"images.txt": 1, "train_test_split.txt": 2, "image_class_labels.txt": 3,
             "bounding_boxes.txt": 4}
    for name, column in files.items():
        (tmp_path / name).write_text("".join(f"{r[0]} {r[column]}\n" for r in rows))
    data = discover(tmp_path)
    assert data.layout == "cub"
    assert data.items == [Item("images/001.Albatross/b.jpg", 0, (0.0, 0.0, 5.0, 5.0)),
                          Item("images/002.Auklet/c.jpg", 1, (1.5, 2.0, 5.5, 8.0))]


def test_missing_or_empty_data_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        discover(tmp_path / "nope")
    with pytest.raises(InputError, match="no class folders"):
        discover(tmp_path)
