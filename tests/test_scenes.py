"""benchmarks/make_scenes.py: scenes reproducible by seed, boxes inside the canvas, distinct classes,
objects pasted where their boxes say, COCO json that pycocotools reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import make_scenes  # noqa: E402

CLASSES = 6


@pytest.fixture(scope="module")
def tin10(tmp_path_factory) -> Path:
    """A tin10-shaped folder: 6 classes, 3 images each per split, each with a distinct solid
    colour inside its box (so a pasted object can be recognised) and noise outside."""
    root = tmp_path_factory.mktemp("tin10")
    rng = np.random.default_rng(0)
    rows = []
    for k in range(CLASSES):
        wnid = f"n0000000{k}"
        rows.append(f"{wnid}\tthing {k}, other name")
        for split in ("train", "val"):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            lines = []
            for i in range(3):
                image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
                x0, y0, x1, y1 = 5 + i, 8, 50, 40 + 5 * i  # inclusive box
                image[y0 : y1 + 1, x0 : x1 + 1] = (40 * k, 255 - 40 * k, 100 + 20 * i)
                Image.fromarray(image).save(folder / f"{wnid}_{i}.png")
                lines.append(f"{wnid}_{i}.png\t{x0}\t{y0}\t{x1}\t{y1}")
            (folder / "boxes.txt").write_text("\n".join(lines) + "\n")
    (root / "classes.tsv").write_text("\n".join(rows) + "\n")
    return root


def _make(tin10: Path, out: Path, seed: int) -> dict:
    assert make_scenes.main([str(out), "--seed", str(seed), "--train", "6", "--val", "2",
                             "--tin10", str(tin10)]) == 0
    return json.loads((out / "train.json").read_text())


def test_same_seed_same_scenes_other_seed_other_scenes(tin10, tmp_path):
    a, b, c = (_make(tin10, tmp_path / name, seed) for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    assert a == b
    for image in a["images"]:
        assert (tmp_path / "a" / image["file_name"]).read_bytes() == (tmp_path / "b" / image["file_name"]).read_bytes()
    assert a["annotations"] != c["annotations"]


def test_boxes_inside_canvas_classes_distinct_and_pasted_where_the_box_says(tin10, tmp_path):
    coco = _make(tin10, tmp_path, 0)
    assert [c["id"] for c in coco["categories"]] == list(range(1, CLASSES + 1))
    assert coco["categories"][2]["name"] == "thing 2"
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image in coco["images"]:
        anns = by_image[image["id"]]
        assert 224 <= image["width"] <= 320 and 224 <= image["height"] <= 320
        assert 2 <= len(anns) <= 5
        labels = [a["category_id"] for a in anns]
        assert len(set(labels)) == len(labels)
        pixels = np.asarray(Image.open(tmp_path / image["file_name"]).convert("RGB")).astype(int)
        boxes = []
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
            assert 56 <= max(w, h) <= 128
            boxes.append((x, y, x + w, y + h))
            k = ann["category_id"] - 1  # the box's centre holds its class's solid colour
            centre = pixels[y + h // 2, x + w // 2]
            assert abs(centre[0] - 40 * k) <= 3 and abs(centre[1] - (255 - 40 * k)) <= 3
        for i, a in enumerate(boxes):
            for b in boxes[:i]:
                assert make_scenes.iou(a, b) <= make_scenes.MAX_OVERLAP


def test_pycocotools_reads_the_json(tin10, tmp_path):
    coco_module = pytest.importorskip("pycocotools.coco")
    _make(tin10, tmp_path, 1)
    coco = coco_module.COCO(str(tmp_path / "val.json"))
    assert len(coco.getImgIds()) == 2 and len(coco.getAnnIds()) >= 4
