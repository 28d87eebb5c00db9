"""CUB-200-2011 end to end (#15): the folder layout read by `--data`, the test split, the boxes in
input pixels, labels from the model's classes, pointing game and energy in the results."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from relprop.cli.main import main
from relprop.data import discover, load_item
from relprop.models import Preprocessing, preprocessing

CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
# id, image, class id, is_training, box (x, y, width, height)
ROWS = [(1, "001.Black_footed_Albatross/a1.jpg", 1, 0, (4, 6, 20, 16)),
        (2, "001.Black_footed_Albatross/a2.jpg", 1, 1, (0, 0, 10, 10)),
        (3, "001.Black_footed_Albatross/a3.jpg", 1, 0, (30, 10, 18, 24)),
        (4, "002.Laysan_Albatross/b1.jpg", 2, 0, (10, 2, 30, 30)),
        (5, "002.Laysan_Albatross/b2.jpg", 2, 1, (1, 1, 5, 5)),
        (6, "002.Laysan_Albatross/b3.jpg", 2, 0, (8, 8, 8, 8))]


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    """A tiny CUB_200_2011 tree: 64x48 photos, black with a white rectangle where the bird's box is."""
    root = tmp_path_factory.mktemp("CUB_200_2011")
    for _, rel, _, _, (x, y, w, h) in ROWS:
        pixels = np.zeros((48, 64, 3), dtype=np.uint8)
        pixels[y:y + h, x:x + w] = 255
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "images" / rel, quality=95)

    def table(name, column):
        (root / name).write_text("".join(f"{r[0]} {column(r)}\n" for r in ROWS))

    table("images.txt", lambda r: r[1])
    table("image_class_labels.txt", lambda r: r[2])
    table("train_test_split.txt", lambda r: r[3])
    table("bounding_boxes.txt", lambda r: " ".join(f"{v}.0" for v in r[4]))
    (root / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(CLASSES)))
    return root


def test_test_split_boxes_and_labels_from_the_models_classes(cub):
    data = discover(cub, CLASSES[::-1])  # the model's order decides
    assert data.layout == "cub"
    assert [(it.path, it.label, it.box) for it in data.items] == [
        ("images/001.Black_footed_Albatross/a1.jpg", 1, (4.0, 6.0, 24.0, 22.0)),
        ("images/001.Black_footed_Albatross/a3.jpg", 1, (30.0, 10.0, 48.0, 34.0)),
        ("images/002.Laysan_Albatross/b1.jpg", 0, (10.0, 2.0, 40.0, 32.0)),
        ("images/002.Laysan_Albatross/b3.jpg", 0, (8.0, 8.0, 16.0, 16.0))]
    by_name = discover(cub, ["n1", "n2"], ["Laysan Albatross", "Black footed Albatross"])
    assert [it.label for it in by_name.items] == [1, 1, 0, 0]
    by_index = discover(cub, ["0", "1"])  # a plain state dict's classes: CUB's class id - 1
    assert [it.label for it in by_index.items] == [0, 0, 1, 1]


def test_boxes_land_on_the_bird_in_the_model_input(cub):
    spec = Preprocessing(resize=40, crop=32, mean=[0.0] * 3, std=[1.0] * 3)
    for item in discover(cub, CLASSES).items:
        x, box = load_item(cub, item, preprocessing(spec), spec)
        bright = np.argwhere(x[0].numpy() > 0.5)
        (y0, x0), (y1, x1) = bright.min(0), bright.max(0) + 1
        assert box == pytest.approx((x0, y0, x1, y1), abs=1.5)


def test_evaluate_on_cub_scores_pointing_game_and_energy(cub, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "cub.pt"
    torch.save({"arch": "resnet18", "num_classes": 2, "classes": CLASSES, "input_size": 32,
                "resize": 32, "crop": None, "mean": [0.5] * 3, "std": [0.25] * 3,
                "state_dict": torchvision.models.resnet18(num_classes=2).state_dict()}, weights)
    out = tmp_path / "out"
    assert main(["evaluate", "--weights", str(weights), "--data", str(cub), "--per-class", "5",
                 "--methods", "gradient", "--step", "500", "--device", "cpu", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").open()]
    assert sorted((r["image"], r["label"]) for r in records) == [
        ("images/001.Black_footed_Albatross/a1.jpg", 0), ("images/001.Black_footed_Albatross/a3.jpg", 0),
        ("images/002.Laysan_Albatross/b1.jpg", 1), ("images/002.Laysan_Albatross/b3.jpg", 1)]
    for record in records:
        scores = record["localization"]
        assert 0.0 <= scores["pointing"] <= 1.0 and 0.0 <= scores["energy"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())["gradient"]
    assert summary["n"] == 4 and summary["pointing"] is not None and summary["energy"] is not None
