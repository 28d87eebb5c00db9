"""The two-object scene evaluation (`relprop evaluate --task detection --data SCENES.json`): the
explained pair, each metric against a direct computation, the per-scene statistics, resuming, and
one line per bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from dense_helpers import tiny_fcos
from PIL import Image
from torchvision.transforms.functional import to_tensor

from relprop.cli.main import main
from relprop.detection.crp import CRP
from relprop.errors import InputError
from relprop.evaluation import scenes as S
from relprop.evaluation.detection import insertion_deletion
from relprop.evaluation.statistics import paired_comparison

torch.set_num_threads(1)
CLASSES = ["__background__", "n1", "n2", "n3"]
NAMES = ["background", "ant", "bee", "cat"]
STEP = 512  # 8 frames at 64 x 64


@pytest.fixture(scope="module")
def detector():
    return tiny_fcos(num_classes=4)


@pytest.fixture(scope="module")
def scene_folder(tmp_path_factory, detector) -> Path:
    """Three 64 px scenes whose objects are the detector's own two best detections of different
    classes (so they are true positives), plus one file that is not an image."""
    root = tmp_path_factory.mktemp("scenes")
    (root / "val").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(3):
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "val" / f"s{i}.png")
        with torch.no_grad():
            (det,) = detector([to_tensor(Image.open(root / "val" / f"s{i}.png").convert("RGB"))])
        labels, sides = det["labels"].tolist(), det["boxes"][:, 2:] - det["boxes"][:, :2]
        boxed = [d for d in range(len(labels)) if labels[d] and bool((sides[d] >= 4).all())]  # not flat, not 0
        first = boxed[0]
        second = next(d for d in boxed if labels[d] != labels[first])
        images.append({"id": i + 1, "file_name": f"val/s{i}.png", "width": 64, "height": 64})
        for d in (first, second):
            x0, y0, x1, y1 = det["boxes"][d].tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": labels[d],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    (root / "val" / "broken.png").write_bytes(b"not a png")
    images.append({"id": 4, "file_name": "val/broken.png", "width": 64, "height": 64})
    categories = [{"id": k, "name": NAMES[k], "wnid": CLASSES[k]} for k in (1, 2, 3)]
    (root / "val.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                               "categories": categories}))
    return root


def test_the_pair_is_two_true_positives_of_different_classes(detector, scene_folder):
    scenes = S.read_scenes(scene_folder / "val.json", CLASSES)
    assert len(scenes) == 4 and [len(s.objects) for s in scenes] == [2, 2, 2, 0]
    crp = CRP(detector)
    out = crp.detect([S.load_tensor(scenes[0].path)])
    pair = S.explained_pair(out, scenes[0])
    labels = [int(out.detections[0]["labels"][d]) for d, _ in pair]
    assert [obj.label for _, obj in pair] == labels and labels[0] != labels[1]
    for d, obj in pair:  # the objects are these detections' boxes
        assert torch.allclose(out.detections[0]["boxes"][d], torch.tensor(obj.box), atol=1e-4)
    assert S.explained_pair(out, S.Scene(scenes[0].path, scenes[0].objects[:1])) == []


def test_every_metric_matches_a_direct_computation(detector, scene_folder):
    crp = CRP(detector)
    scene = S.read_scenes(scene_folder / "val.json", CLASSES)[1]
    image = S.load_tensor(scene.path)
    record = S.evaluate_scene(crp, scene, image, S.SCENE_METHODS, STEP)
    out = crp.detect([image])
    pair = S.explained_pair(out, scene)
    for i, (d, obj) in enumerate(pair):
        k = int(out.detections[0]["labels"][d])
        x = out.x.clone().requires_grad_(True)  # gradient x input of the class logit, by hand
        logits = crp.detector.head(list(crp.backbone(x).values()))["cls_logits"]
        (grad,) = torch.autograd.grad(logits[0, int(out.detections[0]["anchors"][d]), k], x)
        heats = {"crp": crp.attribute([image], d, "class", contrast=True)[0].sum(0),
                 "gradxinput": (grad * x)[0].sum(0)}
        for method, heat in heats.items():
            entry = record["methods"][method][i]
            own, other = obj.box, pair[1 - i][1].box  # 64 px scenes: input space = pixels
            assert entry["own"] == pytest.approx(_share(heat, own), abs=1e-5)
            assert entry["other"] == pytest.approx(_share(heat, other), abs=1e-5)
            y, xx = divmod(int(heat.flatten().argmax()), heat.shape[1])
            assert entry["pointing"] == float(own[0] <= xx + 0.5 <= own[2] and own[1] <= y + 0.5 <= own[3])
            curves = insertion_deletion(crp, out.x[0], heat, out.detections[0]["boxes_input"][d], k, STEP)
            assert entry["insertion"] == pytest.approx(curves["insertion"], abs=1e-6)
            assert entry["deletion"] == pytest.approx(curves["deletion"], abs=1e-6)
    assert record["pair"] and record["objects"] == 2


def _share(heat: torch.Tensor, box) -> float:
    """Positive mass whose pixel centres lie in the box, over all positive mass."""
    ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    inside = (xs >= box[0]) & (xs <= box[2]) & (ys >= box[1]) & (ys <= box[3])
    positive = heat.detach().clamp(min=0)
    return float(positive[inside].sum() / positive.sum())


def test_statistics_resample_scenes_and_pair_methods():
    records = [{"pair": True, "methods": {"crp": [{"own": a, "other": b, "pointing": 1.0, "insertion": 0.5,
                                                   "deletion": 0.1}] * 2,
                                          "gradcam": [{"own": b, "other": a, "pointing": 0.0,
                                                       "insertion": 0.4, "deletion": 0.2},
                                                      {"own": a, "other": b, "pointing": 1.0,
                                                       "insertion": 0.4, "deletion": 0.2}]}}
               for a, b in ((0.9, 0.05), (0.7, 0.2), (0.8, 0.1), (0.6, 0.3))] + [{"pair": False}]
    empty = {"own": math.nan, "other": math.nan, "pointing": 1.0, "insertion": 1.0, "deletion": 0.0}
    records.append({"pair": True, "methods": {"crp": records[0]["methods"]["crp"],
                                              "gradcam": [records[0]["methods"]["gradcam"][0], empty]}})
    summary = S.summarize_scenes(records, ("crp", "gradcam"))
    assert summary["scenes"] == 6 and summary["pairs"] == 5
    gradcam = summary["methods"]["gradcam"]  # an empty map (no positive mass) scores nothing:
    assert gradcam["empty_maps"] == 1 and gradcam["id"]["n"] == 4  # its all-ties order is no ranking
    assert gradcam["id"]["mean"] == pytest.approx(0.2) and gradcam["pointing"]["n"] == 4
    records.pop()
    summary = S.summarize_scenes(records, ("crp", "gradcam"))
    crp = summary["methods"]["crp"]
    assert crp["own"]["mean"] == pytest.approx(0.75) and crp["id"]["mean"] == pytest.approx(0.4)
    assert crp["own_vs_other"] == paired_comparison([0.9, 0.7, 0.8, 0.6], [0.05, 0.2, 0.1, 0.3])
    versus = summary["versus"]["gradcam"]["own_minus_other"]
    assert versus["mean_diff"] == pytest.approx(0 - (0.85 + 0.5 + 0.7 + 0.3) / 4)  # gradcam: 0 per scene
    assert S.scene_values(records, "gradcam", "pointing") == [0.5] * 4
    table = S.scenes_markdown(summary)
    assert "| crp | 4 (0) | 0.750 [" in table and "| gradcam | 4 (0) |" in table


def test_cli_resumes_and_names_each_bad_input_on_one_line(detector, scene_folder, tmp_path, capsys, monkeypatch):
    weights = tmp_path / "fcos.pt"
    torch.save({"arch": "tiny_fcos", "num_classes": 4, "input_size": 64, "classes": CLASSES,
                "class_names": NAMES, "state_dict": detector.state_dict()}, weights)
    builder = tmp_path / "fcos_def.py"
    tests = str(Path(__file__).resolve().parent)
    builder.write_text(f"import sys\nsys.path.insert(0, {tests!r})\nfrom dense_helpers import tiny_fcos\n\n"
                       "def from_metadata(meta):\n    return tiny_fcos(num_classes=meta['num_classes'])\n")
    out = tmp_path / "run"
    argv = ["evaluate", "--task", "detection", "--data", str(scene_folder / "val.json"), "--weights",
            str(weights), "--model-def", f"{builder}:from_metadata", "--out", str(out), "--step", str(STEP),
            "--methods", "crp,gradxinput", "--limit", "2"]
    assert main(argv) == 0
    first = (out / "results.jsonl").read_text().splitlines()
    assert len(first) == 2
    capsys.readouterr()
    calls = []
    original = S.evaluate_scene
    monkeypatch.setattr(S, "evaluate_scene", lambda *a, **k: calls.append(a[1].path.name) or original(*a, **k))
    assert main(argv[:-2]) == 1  # all four scenes: two kept, one new, one broken
    assert calls == ["s2.png"]  # the broken file fails to load, before any explanation
    err = [line for line in capsys.readouterr().err.splitlines() if "broken.png" in line]
    assert len(err) == 1 and err[0].startswith("relprop evaluate: skipped") and err[0].count("broken.png") == 1
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == ["val/s0.png", "val/s1.png", "val/s2.png"] and rows[:2] == \
        [json.loads(line) for line in first]
    (skipped,) = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped["image"] == "val/broken.png"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 3 and set(summary["methods"]) == {"crp", "gradxinput"}
    assert not math.isnan(summary["methods"]["crp"]["own_vs_other"]["mean_diff"])
    assert "energy in own box" in (out / "summary.md").read_text()


def test_a_category_the_detector_lacks_is_one_line(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [],
                                                 "categories": [{"id": 1, "name": "zebra"}]}))
    with pytest.raises(InputError, match="category 'zebra' is not one of the detector's classes"):
        S.read_scenes(tmp_path / "s.json", CLASSES, NAMES)
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(InputError, match="not a COCO detection json"):
        S.read_scenes(tmp_path / "t.json", CLASSES)
    (tmp_path / "u.json").write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "ant"}],
                                                 "annotations": [{"id": 7, "category_id": 1, "bbox": [1, 2]}]}))
    with pytest.raises(InputError, match="malformed COCO entry"):
        S.read_scenes(tmp_path / "u.json", CLASSES, NAMES)
