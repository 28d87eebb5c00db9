"""SSD plumbing: detections equal torchvision's, and each one's anchor is the one that produced it."""

from __future__ import annotations

import math

import pytest
import torch
from ssd_helpers import detection_dataset, random_images, shared_detector, tin10_images, tiny_ssd
from torch import nn

from relprop.detection.families import run_detector
from relprop.detection.ssd import (
    AnchorPosition,
    anchor_index,
    check_ssd,
    locate_anchor,
)
from relprop.errors import InputError, TargetError, UnsupportedLayerError

torch.set_num_threads(1)


def _torchvision_dense(model, images):
    """Head outputs and anchors computed by torchvision's own modules (no relprop code)."""
    with torch.no_grad():
        batch, _ = model.transform(images)
        features = list(model.backbone(batch.tensors).values())
        head = model.head(features)
        anchors = model.anchor_generator(batch, features)
    return batch, features, head, anchors


def _brute_force_boxes(codes, anchors, image_size, original_size):
    """All anchors decoded from the SSD box-coder formula (weights 10, 10, 5, 5), clipped, and
    scaled to the original image: written out here, independent of torchvision's BoxCoder."""
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + widths / 2, anchors[:, 1] + heights / 2
    clip = math.log(1000.0 / 16)
    dx, dy = codes[:, 0] / 10, codes[:, 1] / 10
    dw, dh = (codes[:, 2] / 5).clamp(max=clip), (codes[:, 3] / 5).clamp(max=clip)
    pcx, pcy = cx + dx * widths, cy + dy * heights
    pw, ph = widths * torch.exp(dw), heights * torch.exp(dh)
    h, w = image_size
    boxes = torch.stack([
        (pcx - pw / 2).clamp(0, w), (pcy - ph / 2).clamp(0, h),
        (pcx + pw / 2).clamp(0, w), (pcy + ph / 2).clamp(0, h),
    ], 1)
    sy, sx = original_size[0] / h, original_size[1] / w
    return boxes * torch.tensor([sx, sy, sx, sy])


def _brute_force_anchor(detection_box, label, score, boxes, probabilities):
    """Every anchor whose decoded box and class probability reproduce the detection."""
    same_score = (probabilities[:, label] - score).abs() <= 1e-6 * max(1.0, float(score))
    same_box = (boxes - detection_box).abs().amax(1) <= 1e-3
    return (same_score & same_box).nonzero().flatten().tolist()


def _check_against_brute_force(model, images):
    out = run_detector(model, images)
    reference = model(images)
    batch, _, head, anchors = _torchvision_dense(model, images)
    checked, moved = 0, 0
    for i, (det, ref) in enumerate(zip(out.detections, reference, strict=True)):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(det[key], ref[key]), key
        boxes = _brute_force_boxes(
            head["bbox_regression"][i], anchors[i], batch.image_sizes[i], out.original_sizes[i]
        )
        probabilities = torch.softmax(head["cls_logits"][i], -1)
        for d in range(len(det["scores"])):
            label, score = int(det["labels"][d]), float(det["scores"][d])
            matches = _brute_force_anchor(det["boxes"][d], label, score, boxes, probabilities)
            assert matches == [int(det["anchors"][d])], (i, d, matches)
            checked += 1
            moved += int(det["anchors"][d]) != d
    assert checked > 0
    assert moved > 0  # the anchor index is not the detection's position in any list
    return out


def test_anchor_recovery_matches_brute_force_decoding_tiny_ssd():
    _check_against_brute_force(tiny_ssd(), random_images(3))


def test_anchor_recovery_with_ssdlite_head_and_score_threshold():
    # a higher threshold leaves classes with few candidates: positions and anchors diverge
    model = tiny_ssd(lite=True, score_thresh=0.3, num_classes=3)
    _check_against_brute_force(model, random_images(2, seed=1))


def test_anchor_recovery_on_shared_detector():
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    model = shared_detector()
    images = [to_tensor(Image.open(p).convert("RGB")) for p in tin10_images(3)]
    _check_against_brute_force(model, images)


def test_anchor_position_matches_raw_head_channels():
    """Global anchor n lives at channel a*K + k, cell (y, x) of its level's head conv."""
    model = tiny_ssd(num_classes=5)
    images = random_images(1)
    _, features, head, _ = _torchvision_dense(model, images)
    out = run_detector(model, images)
    K = 5
    convs = model.head.classification_head.module_list
    boxes = model.head.regression_head.module_list
    total = out.cls_logits.shape[1]
    for n in range(0, total, 7):
        p = locate_anchor(out.levels, n)
        assert anchor_index(out.levels, p) == n
        with torch.no_grad():
            raw = convs[p.level](features[p.level])[0, p.box * K : (p.box + 1) * K, p.y, p.x]
            raw_box = boxes[p.level](features[p.level])[0, 4 * p.box : 4 * p.box + 4, p.y, p.x]
        assert torch.allclose(raw, head["cls_logits"][0, n], atol=1e-6)
        assert torch.allclose(raw_box, head["bbox_regression"][0, n], atol=1e-6)
    with pytest.raises(TargetError):
        locate_anchor(out.levels, total)


def test_input_space_boxes_scale_to_original_boxes():
    model = tiny_ssd()
    out = run_detector(model, random_images(2))
    for det, (h, w) in zip(out.detections, out.original_sizes, strict=True):
        scale = torch.tensor([w / 64, h / 64, w / 64, h / 64])
        assert torch.allclose(det["boxes_input"] * scale, det["boxes"], atol=1e-4)
        for n, level in zip(det["anchors"], det["levels"], strict=True):
            assert locate_anchor(out.levels, int(n)).level == int(level)


def test_errors_are_one_line_and_typed():
    with pytest.raises(UnsupportedLayerError, match="torchvision SSD"):
        check_ssd(nn.Conv2d(3, 3, 1))
    model = tiny_ssd()
    with pytest.raises(InputError, match=r"\(3,H,W\)"):
        run_detector(model, [torch.rand(1, 64, 64)])
    with pytest.raises(InputError, match="float"):
        run_detector(model, [torch.zeros(3, 8, 8, dtype=torch.uint8)])
    model.train()
    with pytest.raises(InputError, match="eval"):
        run_detector(model, random_images(1))


def test_anchor_position_roundtrip_covers_all_levels():
    model = tiny_ssd()
    out = run_detector(model, random_images(1))
    last = out.levels[-1]
    p = AnchorPosition(last.index, last.height - 1, last.width - 1, last.anchors_per_cell - 1)
    assert anchor_index(out.levels, p) == out.cls_logits.shape[1] - 1


# ---------------------------------------------------------------------- detection evaluation


def test_frame_masks_follow_the_protocol():
    from relprop.evaluation.metrics import auc, frame_masks

    heat = torch.arange(112 * 112, dtype=torch.float32).flip(0).view(112, 112)
    masks = frame_masks(heat)
    assert masks.shape == (26, 112, 112)
    counts = masks.flatten(1).sum(1)
    assert int(counts[0]) == 501 and int(counts[-1]) == 112 * 112
    assert (counts[1:] >= counts[:-1]).all()
    assert bool(masks[0].flatten()[:501].all())  # the highest values come first
    ties = torch.zeros(10, 10)
    ties[0, :3] = 1.0
    tied = frame_masks(ties, step=2)
    assert int(tied[0].sum()) == 3 and int(tied[1].sum()) == 100  # ties go in together
    assert auc([1.0, 0.0]) == pytest.approx(0.5)
    assert auc([0.2, 0.4, 0.6]) == pytest.approx(0.4)


def test_box_metrics():
    from relprop.evaluation.detection import correlation
    from relprop.evaluation.metrics import localization

    def scores(heat, box):  # the detection evaluation's convention: the first maximum points
        return localization(heat[None], [box], pointing="first")[0]

    heat = torch.zeros(10, 10)
    heat[2:4, 2:4] = 1.0
    heat[8, 8] = -5.0  # negative relevance does not count as energy
    box = torch.tensor([2.0, 2.0, 4.0, 4.0])
    assert scores(heat, box)["energy"] == pytest.approx(1.0)
    assert scores(heat, torch.tensor([0.0, 0.0, 3.0, 3.0]))["energy"] == pytest.approx(0.25)
    assert scores(heat, box)["pointing"] == 1.0
    assert scores(heat, torch.tensor([5.0, 5.0, 9.0, 9.0]))["pointing"] == 0.0
    assert scores(heat, torch.tensor([4.0, 4.0, 6.0, 6.0]))["centre_pointing"] == 1.0
    assert scores(heat, box)["centre_pointing"] == 0.0
    # the first maximum in raster order is (2, 2): only it counts, not the share of the plateau
    assert scores(heat, torch.tensor([1.5, 1.5, 2.9, 2.9]))["pointing"] == 1.0
    assert localization(heat[None], [torch.tensor([1.5, 1.5, 2.9, 2.9])])[0]["pointing"] == 0.25
    assert correlation(heat, 2 * heat + 1) == pytest.approx(1.0)
    assert correlation(heat, -heat) == pytest.approx(-1.0)
    assert math.isnan(correlation(heat, torch.ones(10, 10)))


def test_evaluate_detection_end_to_end(tmp_path):
    import json

    from relprop.evaluation.detection import DetectionEvalConfig, evaluate_detection

    model = tiny_ssd()
    data = tmp_path / "data"
    data.mkdir()
    classes = detection_dataset(data, model)
    config = DetectionEvalConfig(data=data, out=tmp_path / "out", progress=False)
    summary = evaluate_detection(model, classes, config)
    assert summary["images"] == 2 and summary["true_positives"] == 2
    for name in ("crp", "lrp-plain", "gradcam"):
        m = summary["methods"][name]
        assert m["n"] == 2
        assert 0.0 <= m["energy"] <= 1.0 and 0.0 <= m["insertion"] <= 1.0
        assert m["id"] == pytest.approx(m["insertion"] - m["deletion"])
    assert -1.0 <= summary["methods"]["lrp-plain"]["contrast_r"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and len(records[0]["methods"]["crp"]["insertion_curve"]) == 9
    assert set(records[0]["direction"]) == {"crp", "gradxinput"}
    assert set(records[0]["direction"]["crp"]) == {"cx", "cy", "w", "h"}
    assert "| crp |" in (tmp_path / "out" / "summary.md").read_text()


def test_read_samples_rejects_unknown_classes(tmp_path):
    from relprop.evaluation.detection import read_samples

    (tmp_path / "zebra").mkdir()
    (tmp_path / "zebra" / "boxes.txt").write_text("a.png 0 0 3 3\n")
    with pytest.raises(InputError, match="zebra"):
        read_samples(tmp_path, ["__background__", "cat"])
    samples = read_samples(tmp_path, ["__background__", "zebra"])
    assert samples[0].label == 1 and samples[0].box == (0.0, 0.0, 4.0, 4.0)


def test_an_empty_map_scores_no_insertion_or_deletion():
    """A map with no positive mass (Grad-CAM's ReLU can leave none) orders pixels by ties only: the
    first frame would insert or delete the whole image. It enters no mean, and is counted."""
    from relprop.evaluation.detection import summarize

    def entry(energy, insertion, deletion):
        return {"energy": energy, "pointing": False, "insertion": insertion, "deletion": deletion,
                "id": insertion - deletion, "contrast_r": 0.0}

    records = [{"true_positive": True, "top1": 1, "label": 1, "box_area_share": 0.2, "centre_hit": True,
                "methods": {"gradcam": entry(0.5, 0.6, 0.2)}},
               {"true_positive": True, "top1": 1, "label": 1, "box_area_share": 0.2, "centre_hit": True,
                "methods": {"gradcam": entry(math.nan, math.nan, math.nan)}}]
    m = summarize(records, methods=["gradcam"])["methods"]["gradcam"]
    assert m["n"] == 2 and m["empty_maps"] == 1
    assert m["insertion"] == pytest.approx(0.6) and m["id"] == pytest.approx(0.4)
    assert m["energy"] == pytest.approx(0.5)
