"""Contrastive Relevance Propagation: contrast, conservation, box splitting, what-if, models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ssd_helpers import random_images, shared_detector, tin10_images, tiny_ssd
from torch import nn

from relprop.detection.crp import CRP, OUTPUTS, box_split, to_image
from relprop.detection.ssd import AnchorPosition, locate_anchor
from relprop.errors import TargetError

torch.set_num_threads(1)


def _sums(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = R.flatten(1)
    return flat.sum(1), flat.abs().sum(1)


def _assert_sums_to_zero(R: torch.Tensor) -> None:
    total, magnitude = _sums(R)
    assert (magnitude > 0).all()
    assert (total.abs() <= 1e-4 * magnitude).all(), (total, magnitude)


def _detection_context(crp: CRP, images, detection: int = 0):
    out = crp.detect(images)
    det = out.detections[0]
    position = locate_anchor(out.levels, int(det["anchors"][detection]))
    x = out.x[:1]
    feature = list(crp.engine.forward(x).output.values())[position.level]
    return out, int(det["labels"][detection]), position, x, feature


def _per_class_high_level(crp: CRP, position, feature, classes):
    return {
        k: crp.head_relevance("class", position, feature, F.one_hot(torch.tensor(k), crp.num_classes).float())
        for k in classes
    }


@pytest.mark.parametrize("include_background", [False, True])
def test_single_pass_contrast_equals_per_class_passes(include_background):
    crp = CRP(tiny_ssd(num_classes=5), include_background=include_background)
    images = random_images(1)
    out, k_star, position, x, feature = _detection_context(crp, images)
    classes = range(0 if include_background else 1, 5)
    R = _per_class_high_level(crp, position, feature, classes)
    others = [k for k in classes if k != k_star]
    contrast_high = R[k_star] - torch.stack([R[k] for k in others]).mean(0)
    from_high = crp.propagate(x, [(position.level, contrast_high[0])])
    single = crp.explain(out, [_request(0, 0, "class")])
    scale = single.abs().max()
    assert torch.allclose(single, from_high, atol=1e-5 * scale)
    # and propagating every class to the input first gives the same map (linearity below)
    inputs = {k: crp.propagate(x, [(position.level, R[k][0])]) for k in classes}
    from_input = inputs[k_star] - torch.stack([inputs[k] for k in others]).mean(0)
    assert torch.allclose(single, from_input, atol=1e-5 * scale)
    # the contrast is not a no-op: the plain map of k* differs from it
    assert not torch.allclose(single, inputs[k_star], atol=1e-3 * scale)


def _request(image, detection, output, target_class=None, contrast=None):
    from relprop.detection.crp import Request

    return Request(image, detection, output, target_class, contrast)


def test_each_pass_conserves_and_contrast_sums_to_zero():
    crp = CRP(tiny_ssd(num_classes=5))
    images = random_images(2)
    out, k_star, position, x, feature = _detection_context(crp, images)
    for k in range(1, 5):
        high = _per_class_high_level(crp, position, feature, [k])[k]
        assert torch.allclose(high.sum(), torch.tensor(1.0), atol=1e-4)
        total, _ = _sums(crp.propagate(x, [(position.level, high[0])]))
        assert torch.allclose(total, torch.ones(1), atol=1e-4)
    for output in OUTPUTS:
        _assert_sums_to_zero(crp.attribute(images, detection=0, output=output))
    plain, _ = _sums(crp.attribute(images, detection=0, output="class", contrast=False))
    assert torch.allclose(plain, torch.ones(2), atol=1e-4)


def _explicit_contributions(conv: nn.Conv2d, a: torch.Tensor, channel: int, y: int, x: int):
    """z_i = a_i w_ij for output (channel, y, x), by looping over the kernel window."""
    z = torch.zeros_like(a)
    kh, kw = conv.kernel_size
    for c in range(a.shape[1]):
        for dy in range(kh):
            for dx in range(kw):
                iy = y * conv.stride[0] - conv.padding[0] + dy
                ix = x * conv.stride[1] - conv.padding[1] + dx
                if 0 <= iy < a.shape[2] and 0 <= ix < a.shape[3]:
                    z[0, c, iy, ix] = a[0, c, iy, ix] * conv.weight[channel, c, dy, dx]
    return z


@pytest.mark.parametrize("cell", [(0, 0), (2, 3), (4, 4)])
def test_box_split_matches_explicit_contributions(cell):
    torch.manual_seed(3)
    conv = nn.Conv2d(5, 4 * 2, 3, padding=1)
    a = torch.rand(1, 5, 5, 5) - 0.2  # some negative activations too
    position = AnchorPosition(0, cell[0], cell[1], 1)
    with torch.no_grad():
        R = box_split(conv, a, position, offset=2)
        z = _explicit_contributions(conv, a, 4 * 1 + 2, *cell)
    positive, negative = z.clamp(min=0), (-z).clamp(min=0)
    expected = positive / positive.sum() - negative / negative.sum()
    assert torch.allclose(R, expected, atol=1e-6)
    assert torch.allclose(R.clamp(min=0).sum(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(R.clamp(max=0).sum(), torch.tensor(-1.0), atol=1e-5)


def test_box_split_sign_points_along_the_offset():
    """A cx filter that looks right (+) and left (-): R+ lands right of the cell, R- left."""
    conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 2] = 1.0  # offset 0 (cx) of default box 0
        conv.weight[0, 0, 1, 0] = -2.0
        R = box_split(conv, torch.ones(1, 1, 5, 5), AnchorPosition(0, 2, 2, 0), offset=0)
    assert R[0, 0, 2, 3] == pytest.approx(1.0)
    assert R[0, 0, 2, 1] == pytest.approx(-1.0)
    assert R.abs().sum() == pytest.approx(2.0)


def test_what_if_explains_another_class_for_the_same_box():
    crp = CRP(tiny_ssd(num_classes=5))
    images = random_images(1)
    out, k_star, position, x, feature = _detection_context(crp, images)
    other = 1 if k_star != 1 else 2
    what_if = crp.attribute(images, detection=0, output="class", target_class=other)
    seed = crp.class_seed(other)
    assert seed[other] == 1.0 and seed.sum().abs() < 1e-6 and seed[0] == 0.0
    manual = crp.propagate(x, [(position.level, crp.head_relevance("class", position, feature, seed)[0])])
    assert torch.allclose(what_if, manual, atol=1e-5 * manual.abs().max())
    detected = crp.attribute(images, detection=0, output="class")
    assert not torch.allclose(what_if, detected, atol=1e-3 * detected.abs().max())
    with pytest.raises(TargetError, match="target_class"):
        crp.attribute(images, detection=0, target_class=5)
    with pytest.raises(TargetError, match="detection"):
        crp.attribute(images, detection=10_000)
    with pytest.raises(TargetError, match="output"):
        crp.attribute(images, output="x0")


def test_box_contrast_subtracts_the_other_offsets():
    model = tiny_ssd()
    images = random_images(1)
    plain = {o: CRP(model).attribute(images, output=o) for o in ("cx", "cy", "w", "h")}
    contrasted = CRP(model, box_contrast=True).attribute(images, output="cy")
    expected = plain["cy"] - (plain["cx"] + plain["w"] + plain["h"]) / 3
    assert torch.allclose(contrasted, expected, atol=1e-5 * expected.abs().max())


def test_batch_rows_are_explained_independently():
    crp = CRP(tiny_ssd())
    images = random_images(2)
    batch = crp.attribute(images, detection=1, output="w")
    for i, image in enumerate(images):
        alone = crp.attribute([image], detection=1, output="w")
        assert torch.allclose(batch[i], alone[0], atol=1e-6)


def test_explain_detections_threshold_and_cap():
    crp = CRP(tiny_ssd(), chunk_size=3)
    images = random_images(2)
    out = crp.detect(images)
    threshold = float(out.detections[0]["scores"][4])
    found = crp.explain_detections(images, score_threshold=threshold, max_detections=3,
                                   outputs=("class", "cx"))
    for i, explanations in enumerate(found):
        expected = min(3, int((out.detections[i]["scores"] >= threshold).sum()))
        assert len(explanations) == expected
        for e in explanations:
            assert e.score >= threshold and set(e.maps) == {"class", "cx"}
            single = crp.attribute([images[i]], detection=e.detection, output="cx")[0]
            assert torch.allclose(e.maps["cx"], single, atol=1e-6)
    assert len(found[0]) == 3
    assert crp.explain_detections(images, score_threshold=1.01) == [[], []]


def test_ssdlite_head_prefix_conserves():
    crp = CRP(tiny_ssd(lite=True))
    images = random_images(1)
    for output in ("class", "cx", "h"):
        _assert_sums_to_zero(crp.attribute(images, output=output))
    plain, _ = _sums(crp.attribute(images, output="class", contrast=False))
    assert torch.allclose(plain, torch.ones(1), atol=1e-4)


def test_shared_detector_maps_conserve():
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    crp = CRP(shared_detector())
    images = [to_tensor(Image.open(p).convert("RGB")) for p in tin10_images(2)]
    for output in OUTPUTS:
        R = crp.attribute(images, output=output)
        assert R.shape == (2, 3, 112, 112) and torch.isfinite(R).all()
        _assert_sums_to_zero(R)
    plain, _ = _sums(crp.attribute(images, output="class", contrast=False))
    assert torch.allclose(plain, torch.ones(2), atol=1e-4)
    heat = to_image(R[0], (64, 64))
    assert heat.shape == (64, 64)


@pytest.mark.slow
def test_ssd300_vgg16_l2norm_passes_and_maps_conserve():
    """The one 300 px test: VGG16 with ceil-mode max pool and the L2Norm wrapper."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.detection.ssd300_vgg16(
        weights=None, weights_backbone=None, num_classes=3
    ).eval()
    crp = CRP(model)
    x = torch.rand(1, 3, 300, 300) * 2
    with torch.no_grad():
        ours, theirs = crp.backbone(x), model.backbone(x)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key])
    image = random_images(1, sizes=((300, 300),))
    plain, _ = _sums(crp.attribute(image, output="class", contrast=False))
    assert torch.allclose(plain, torch.ones(1), atol=1e-4)
    _assert_sums_to_zero(crp.attribute(image, output="cx"))


def test_ssdlite_mobilenet_needs_no_rule_for_its_activations():
    """Hardswish takes the identity rule by default (relprop 0.1 needed rules={nn.Hardswish: "pass"})."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3
    ).eval()
    CRP(model)
