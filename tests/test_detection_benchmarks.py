"""Helpers of the detection benchmarks (box_direction.py, train_yolo.py), hand-computed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import box_direction  # noqa: E402
import train_yolo  # noqa: E402


def test_wilson_interval_matches_the_textbook_value():
    low, high = box_direction.wilson(8, 10)  # p = 0.8, n = 10: Wilson 95 % = [0.490, 0.943]
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert all(v != v for v in box_direction.wilson(0, 0))  # NaN without trials


def test_the_direction_table_has_a_row_per_side_and_the_random_baseline():
    rates = {"split": {o: {"positive": 0.8, "negative": 0.25, "random": 0.5,
                           "positive_ci": box_direction.wilson(8, 10), "negative_ci": (0.1, 0.5)}
                       for o in ("cx", "cy")}}
    table = box_direction.markdown({"detector": "d", "detections": 10, "rates": rates}).splitlines()
    assert table[2] == "| candidate | cx | cy |"
    assert table[4] == "| split + | 80 % [49, 94] | 80 % [49, 94] |"
    assert table[5] == "| split − | 25 % [10, 50] | 25 % [10, 50] |"
    assert table[6] == "| random 10 % removed: lower | 50 % | 50 % |"


def test_yolo_layout_writes_normalized_centre_boxes_with_the_scenes_class_ids(tmp_path):
    """One 200 x 100 scene with a box (x 20, y 10, w 40, h 30) of category 3: Ultralytics' label
    line is ``3 cx/W cy/H w/W h/H`` = ``3 0.2 0.25 0.2 0.3``; an image without boxes gets an empty file."""
    import json

    scenes = tmp_path / "scenes"
    (scenes / "train").mkdir(parents=True)
    (scenes / "val").mkdir()
    for split, boxes in (("train", [[20, 10, 40, 30]]), ("val", [])):
        (scenes / split / "a.png").write_bytes(b"")
        coco = {"images": [{"id": 1, "file_name": f"{split}/a.png", "width": 200, "height": 100}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": b} for b in boxes],
                "categories": [{"id": 3, "name": "penguin"}]}
        (scenes / f"{split}.json").write_text(json.dumps(coco))
    config = train_yolo.yolo_layout(scenes, tmp_path / "yolo")
    line = (tmp_path / "yolo" / "labels" / "train" / "a.txt").read_text().split()
    assert line[0] == "3" and [float(v) for v in line[1:]] == pytest.approx([0.2, 0.25, 0.2, 0.3])
    assert (tmp_path / "yolo" / "labels" / "val" / "a.txt").read_text().strip() == ""
    assert (tmp_path / "yolo" / "images" / "train" / "a.png").resolve() == (scenes / "train" / "a.png").resolve()
    text = config.read_text()
    assert "  0: background" in text and "  3: penguin" in text
