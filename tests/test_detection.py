"""SSD plumbing: detections equal torchvision's, and each one's anchor is the one that produced it."""

from __future__ import annotations

import math

import pytest
import torch
from ssd_helpers import random_images, shared_detector, tin10_images, tiny_ssd
from torch import nn

from relprop.detection import (
    AnchorPosition,
    anchor_index,
    check_ssd,
    locate_anchor,
    run_detector,
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
