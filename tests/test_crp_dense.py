"""CRP on RetinaNet and FCOS (feature pyramids): detections, anchors, conservation, box rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dense_helpers import tiny_fcos, tiny_retinanet
from ssd_helpers import random_images
from torchvision.models.detection.fcos import FCOS
from torchvision.ops import boxes as box_ops

from relprop import Composite
from relprop.core.splitting import SignedSplit
from relprop.detection.crp import CRP
from relprop.detection.families import dense_outputs, family_of, head_level
from relprop.detection.ssd import locate_anchor
from relprop.errors import InputError, TargetError, UnsupportedLayerError

from references import LRP0_RULES, Z_RULE

torch.set_num_threads(1)
BUILDERS = {"retinanet": tiny_retinanet, "fcos": tiny_fcos}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def detector(request):
    return BUILDERS[request.param]()


def test_detections_equal_torchvision_and_anchors_decode_to_them(detector):
    images = random_images(2)
    with torch.no_grad():
        reference = detector(images)
    out = CRP(detector).detect(images)
    for theirs, ours in zip(reference, out.detections, strict=True):
        assert len(theirs["scores"]) > 3
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(theirs[key], ours[key]), key
    for i, det in enumerate(out.detections):  # brute force: each anchor re-decoded from scratch
        for d, n in enumerate(det["anchors"].tolist()):
            k = int(det["labels"][d])
            score = torch.sigmoid(out.cls_logits[i, n, k])
            if isinstance(detector, FCOS):
                score = torch.sqrt(score * torch.sigmoid(out.extras["ctr"][i, n, 0]))
                box = detector.box_coder.decode(out.bbox_regression[i, n][None], out.anchors[i][n][None])
            else:
                box = detector.box_coder.decode_single(out.bbox_regression[i, n][None], out.anchors[i][n][None])
            box = box_ops.clip_boxes_to_image(box, out.image_sizes[i])[0]
            assert float(score) == pytest.approx(float(det["scores"][d]), rel=1e-6)
            assert torch.allclose(box, det["boxes_input"][d], atol=1e-4)
            assert int(det["levels"][d]) == locate_anchor(out.levels, n).level


def _sums(R):
    return R.flatten(1).sum(1), R.flatten(1).abs().sum(1)


def test_class_maps_conserve_and_contrast_sums_to_zero(detector):
    crp = CRP(detector)
    images = random_images(2)
    plain, _ = _sums(crp.attribute(images, detection=1, output="class", contrast=False))
    assert torch.allclose(plain, torch.ones(2), atol=1e-4)
    total, magnitude = _sums(crp.attribute(images, detection=1, output="class"))
    assert (magnitude > 0).all() and (total.abs() <= 1e-4 * magnitude).all()


def test_split_box_maps_sum_to_zero_at_the_pyramid_and_the_input(detector):
    crp = CRP(detector)
    images = random_images(1)
    out = crp.detect(images)
    position = locate_anchor(out.levels, int(out.detections[0]["anchors"][0]))
    feature = list(crp.engine.forward(out.x).output.values())[position.level]
    for j, name in enumerate(crp.family.box_outputs):
        high = crp.head_relevance("box", position, feature, j)  # R+ - R- through the conv tower
        assert float(high.abs().sum()) > 1e-3 and abs(float(high.sum())) < 1e-5
        total, magnitude = _sums(crp.attribute(images, output=name))
        assert (magnitude > 0).all() and (total.abs() <= 1e-4 * magnitude).all()


def _pre_bias(crp, out, kind, j):
    """The explained output at the detection's anchor minus its head conv's bias."""
    n = int(out.detections[0]["anchors"][0])
    position = locate_anchor(out.levels, n)
    conv = head_level(crp.detector, kind, position.level).conv
    columns = 1 if kind == "ctr" else 4
    boxes = out.extras.get("box_raw", out.bbox_regression)  # FCOS: the distances before their ReLU
    value = out.extras["ctr"][0, n, 0] if kind == "ctr" else boxes[0, n, j]
    return float(value - conv.bias[columns * position.box + j].detach())


def test_signed_box_maps_sum_to_the_output_minus_its_bias(detector):
    crp = CRP(detector, box_rule="signed")
    images = random_images(1)
    out = crp.detect(images)
    outputs = [("box", j, name) for j, name in enumerate(crp.family.box_outputs)]
    if isinstance(detector, FCOS):
        outputs.append(("ctr", 0, "ctr"))
    for kind, j, name in outputs:
        expected = _pre_bias(crp, out, kind, j)
        total, _ = _sums(crp.attribute(images, output=name))
        assert float(total[0]) == pytest.approx(expected, rel=1e-3, abs=1e-5)


def _lrp0() -> Composite:
    return Composite(rules=LRP0_RULES, input_rule=Z_RULE, maxpool="wta", split=SignedSplit(epsilon=0.0))


def test_signed_rule_with_lrp0_below_is_gradient_x_input():
    """ReLU network, LRP-0 everywhere (the FPN's adds split by the unstabilized signed z-rule,
    its nearest upsampling in proportion): exactly gradient x input of the offset."""
    detector = tiny_retinanet()
    crp = CRP(detector, box_rule="signed", box_composite=_lrp0())
    images = random_images(1)
    out = crp.detect(images)
    n, j = int(out.detections[0]["anchors"][2]), 3
    x = out.x.clone().requires_grad_(True)
    features = list(detector.backbone(x).values())
    offset = detector.head.regression_head(features)[0, n, j]
    (grad,) = torch.autograd.grad(offset, x)
    R = crp.attribute(images, detection=2, output="h")
    expected = (grad * x).detach()
    assert torch.allclose(R, expected, atol=1e-4 * float(expected.abs().max()))


def _detached_group_norm(norm: torch.nn.GroupNorm):
    """GroupNorm's forward with its std held constant by autograd: (x − mean) / std.detach() · w + b."""

    def forward(h):
        groups = h.reshape(h.shape[0], norm.num_groups, -1)
        std = (groups.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt().detach()
        centred = ((groups - groups.mean(-1, keepdim=True)) / std).reshape(h.shape)
        return centred * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)

    return forward


def test_signed_rule_with_lrp0_and_norm_epsilon_below_is_gradient_x_input_with_std_detached():
    """FCOS's head has GroupNorm: LRP-0 below the signed head with GroupNorm as the linear map it is
    with its std held constant (`norm-epsilon` at ε = 0) is gradient x input of the offset in the
    same detector with every GroupNorm's std detached. The identity rule there (plain LRP-0) is not."""
    import copy

    from relprop.core.rules import NormEpsilonRule
    from relprop.evaluation.detection import raw_box_outputs

    detector = tiny_fcos()
    norms = {torch.nn.GroupNorm: NormEpsilonRule(0.0)}
    spelled_out = CRP(detector, box_rule="signed", box_composite=_lrp0().replace(rules={**LRP0_RULES, **norms}))
    crp = CRP(detector, box_rule="lrp0")  # the registered definition (BOX_RULES) is that composite
    images = random_images(1)
    out = crp.detect(images)
    reference = copy.deepcopy(detector)
    for module in reference.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.forward = _detached_group_norm(module)
    for d in range(3):
        n = int(out.detections[0]["anchors"][d])
        x = out.x.clone().requires_grad_(True)
        offsets = raw_box_outputs(dense_outputs(reference, x))
        for j, name in enumerate(crp.family.box_outputs):
            (grad,) = torch.autograd.grad(offsets[0, n, j], x, retain_graph=True)
            expected = (grad * x).detach()
            R = crp.attribute(images, detection=d, output=name)
            assert torch.allclose(R, expected, atol=1e-4 * float(expected.abs().max())), (d, name)
            assert torch.equal(R, spelled_out.attribute(images, detection=d, output=name))
    plain = CRP(detector, box_rule="signed", box_composite=_lrp0()).attribute(images, detection=2, output="b")
    assert not torch.allclose(plain, expected, atol=1e-2 * float(expected.abs().max()))


def test_box_rules_by_name_and_their_refusals():
    """Each registered box rule runs and says what its maps can be read as; `lrp0` sets the box
    composite itself, so one given beside it is refused, as is an unknown name."""
    from relprop.detection.box_rules import BOX_RULES

    detector, images = tiny_retinanet(), random_images(1)
    caveats = {}
    for name in BOX_RULES:
        crp = CRP(detector, box_rule=name)
        R = crp.attribute(images, detection=0, output="w")
        assert torch.isfinite(R).all() and R.abs().sum() > 0
        caveats[name] = crp.box_caveat
    assert "push the output up/down" in caveats["lrp0"] and "does not move" in caveats["split"]
    with pytest.raises(InputError, match="sets the box composite itself"):
        CRP(detector, box_rule="lrp0", box_composite=_lrp0())
    with pytest.raises(InputError, match="choose one of split, signed, lrp0"):
        CRP(detector, box_rule="gradient")


def test_outputs_and_refusals():
    crp = CRP(tiny_fcos())
    assert crp.outputs == ("class", "l", "t", "r", "b", "ctr")
    assert CRP(tiny_retinanet()).outputs == ("class", "cx", "cy", "w", "h")
    with pytest.raises(TargetError, match="choose one of: class, l, t, r, b, ctr"):
        crp.attribute(random_images(1), output="cx")
    with pytest.raises(UnsupportedLayerError, match="SSD, RetinaNet or FCOS"):
        family_of(torch.nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize("arch", ["ssd_resnet18", "retinanet_resnet18_fpn", "fcos_resnet18_fpn"])
def test_resnet18_builders_are_explained_with_conservation(arch):
    from relprop.detection.builders import build_detector

    torch.manual_seed(0)
    model = build_detector(arch, 4, size=96, score_thresh=1e-3).eval()
    images = random_images(1, sizes=((96, 96),))
    with torch.no_grad():
        (reference,) = model(images)
    crp = CRP(model)
    (ours,) = crp.detect(images).detections
    assert len(ours["scores"]) > 0 and torch.equal(reference["boxes"], ours["boxes"])
    plain, _ = _sums(crp.attribute(images, output="class", contrast=False))
    assert torch.allclose(plain, torch.ones(1), atol=1e-4)


def test_relprop_detect_writes_fcos_panels(tmp_path, capsys):
    """`relprop detect` on an FCOS checkpoint with a --model-def builder: one panel per detection,
    with the class, l t r b and centerness maps."""
    import json

    from PIL import Image

    from relprop.cli.main import main

    model = tiny_fcos(num_classes=4)
    weights = tmp_path / "fcos.pt"
    torch.save({"arch": "tiny_fcos", "num_classes": 4, "input_size": 64,
                "classes": ["__background__", "a", "b", "c"], "state_dict": model.state_dict()}, weights)
    builder = tmp_path / "fcos_def.py"
    tests = str(Path(__file__).resolve().parent)
    builder.write_text(f"import sys\nsys.path.insert(0, {tests!r})\nfrom dense_helpers import tiny_fcos\n\n"
                       "def from_metadata(meta):\n    return tiny_fcos(num_classes=meta['num_classes'])\n")
    image = tmp_path / "img.png"
    Image.fromarray((random_images(1)[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(image)
    out = tmp_path / "out"
    code = main(["detect", str(image), "--weights", str(weights), "--model-def", f"{builder}:from_metadata",
                 "--out", str(out), "--max-detections", "2", "--score-threshold", "0.5"])
    assert code in (0, None), capsys.readouterr().err
    records = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    from torchvision.transforms.functional import to_tensor

    expected = CRP(model).detect([to_tensor(Image.open(image).convert("RGB"))]).detections[0]
    assert len(records) == min(2, int((expected["scores"] >= 0.5).sum())) == 2
    assert [r["anchor"] for r in records] == expected["anchors"][:2].tolist()
    assert all((out / r["panel"]).is_file() for r in records)
