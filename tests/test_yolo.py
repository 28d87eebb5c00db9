"""CRP on Ultralytics YOLOv8 (relprop.detection.yolo): detections against Ultralytics' own
pre- and post-processing, the DFL seed against autograd, conservation at the heads and the input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from ssd_helpers import random_images

pytest.importorskip("ultralytics", reason="the yolo extra (Ultralytics) is not installed")

from ultralytics.data.augment import LetterBox  # noqa: E402
from ultralytics.utils.nms import non_max_suppression  # noqa: E402
from ultralytics.utils.ops import scale_boxes  # noqa: E402
from ultralytics.utils.tal import dist2bbox, make_anchors  # noqa: E402

from relprop.detection.box_rules import BOX_RULES  # noqa: E402
from relprop.detection.builders import build_detector  # noqa: E402
from relprop.detection.crp import CRP  # noqa: E402
from relprop.detection.families import family_of, head_level  # noqa: E402
from relprop.detection.ssd import locate_anchor  # noqa: E402
from relprop.detection.yolo import LetterboxTransform, dfl_seed  # noqa: E402

torch.set_num_threads(1)
SIZE = 96


@pytest.fixture(scope="module")
def yolo():
    torch.manual_seed(0)
    model = build_detector("yolov8n", 5, SIZE).eval()
    with torch.no_grad():  # spread the head's priors: varied scores, labels and boxes from random weights
        for branch, spread in ((model.head.cv3, 2.0), (model.head.cv2, 1.0)):
            for level in branch:
                level[-1].bias.normal_(0.0, spread)
    return model


def _sums(R):
    return R.flatten(1).sum(1), R.flatten(1).abs().sum(1)


def test_letterbox_equals_ultralytics_and_boxes_map_back_as_scale_boxes():
    image = np.random.default_rng(0).integers(0, 256, (64, SIZE, 3), dtype=np.uint8)  # no resize: exact
    theirs = LetterBox((SIZE, SIZE), auto=False, center=True)(image=image)
    batch, _ = LetterboxTransform(SIZE)([torch.from_numpy(image).permute(2, 0, 1).float() / 255])
    ours = (batch.tensors[0] * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(theirs, ours)
    boxes = torch.tensor([[10.0, 12.0, 50.0, 70.0], [0.0, 30.0, 96.0, 90.0]])
    for height, width in ((230, 270), (300, 250), (64, 96)):
        expected = scale_boxes((SIZE, SIZE), boxes.clone(), (height, width))
        (ours,) = LetterboxTransform(SIZE).postprocess([{"boxes": boxes.clone()}], [(SIZE, SIZE)], [(height, width)])
        assert torch.allclose(ours["boxes"], expected, atol=1e-4)


def test_detections_equal_ultralytics_nms_and_anchors_decode_to_them(yolo):
    images = random_images(2)
    out = CRP(yolo).detect(images)
    with torch.no_grad():
        reference = yolo(images)
        decoded = yolo.model(out.x)[0]  # the Ultralytics model on the same letterboxed batch
    rows = non_max_suppression(decoded, yolo.score_thresh, yolo.nms_thresh, max_det=yolo.detections_per_img)
    strides = yolo.head.stride
    points, stride = make_anchors(out.features, strides, 0.5)
    for i, (theirs, ours, row) in enumerate(zip(reference, out.detections, rows, strict=True)):
        assert len(row) > 3
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(theirs[key], ours[key]), key
        assert torch.equal(ours["boxes_input"], row[:, :4]) and torch.equal(ours["scores"], row[:, 4])
        for d, n in enumerate(ours["anchors"].tolist()):  # each anchor re-decoded from scratch
            k = int(ours["labels"][d])
            assert float(torch.sigmoid(out.cls_logits[i, n, k])) == pytest.approx(float(ours["scores"][d]), rel=1e-6)
            box = dist2bbox(out.bbox_regression[i, n][None], points[n][None], xywh=False) * stride[n]
            assert torch.allclose(box[0], ours["boxes_input"][d], atol=1e-3)
            assert int(ours["levels"][d]) == locate_anchor(out.levels, n).level


def test_dfl_seed_is_the_gradient_of_the_distance_by_the_heads_own_dfl(yolo):
    logits = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    distances = copy.deepcopy(yolo.head.dfl).double()(logits[:, :, None])[:, :, 0]  # (3, 4), Ultralytics' DFL
    for side in range(4):
        (grad,) = torch.autograd.grad(distances[:, side].sum(), logits, retain_graph=True)
        channels, seed = dfl_seed(logits.detach(), side)
        assert torch.allclose(grad[:, channels], seed, atol=1e-12)
        assert grad[:, :channels.start].abs().sum() == 0 and grad[:, channels.stop :].abs().sum() == 0


def test_class_maps_conserve_at_the_head_and_the_input(yolo):
    crp = CRP(yolo)
    images = random_images(2)
    out = crp.detect(images)
    position = locate_anchor(out.levels, int(out.detections[0]["anchors"][1]))
    feature = list(crp.engine.forward(out.x[:1]).output.values())[position.level]
    high = crp.head_relevance("class", position, feature, crp.class_seed(int(out.detections[0]["labels"][1]), False))
    assert float(high.sum()) == pytest.approx(1.0, abs=1e-4)  # z+ through the class branch's convs
    plain, _ = _sums(crp.attribute(images, detection=1, output="class", contrast=False))
    assert torch.allclose(plain, torch.ones(2), atol=1e-4)
    total, magnitude = _sums(crp.attribute(images, detection=1, output="class"))
    assert (magnitude > 0).all() and (total.abs() <= 1e-4 * magnitude).all()


def test_box_maps_split_sums_to_zero_and_signed_to_the_linearised_output(yolo):
    images = random_images(1)
    crp = CRP(yolo)
    out = crp.detect(images)
    n = int(out.detections[0]["anchors"][0])
    position = locate_anchor(out.levels, n)
    feature = list(crp.engine.forward(out.x).output.values())[position.level]
    for j, name in enumerate(crp.family.box_outputs):
        high = crp.head_relevance("box", position, feature, j)
        assert float(high.abs().sum()) > 1e-3 and abs(float(high.sum())) < 1e-5
        total, magnitude = _sums(crp.attribute(images, output=name))
        assert (magnitude > 0).all() and (total.abs() <= 1e-4 * magnitude).all()
    signed = CRP(yolo, box_rule="signed")
    conv = head_level(yolo, "box", position.level).conv
    logits = out.extras["box_logits"][0, n]
    for j, name in enumerate(signed.family.box_outputs):  # sum_b g_b (z_b - bias_b): the seed's own sum
        channels, g = dfl_seed(logits[None], j)
        expected = float((g[0] * (logits[channels] - conv.bias[channels].detach())).sum())
        total, _ = _sums(signed.attribute(images, output=name))
        assert float(total[0]) == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_yolo_is_its_own_family_with_distance_outputs_and_its_own_lrp0_caveat(yolo):
    assert family_of(yolo).name == "yolo"
    assert CRP(yolo).outputs == ("class", "l", "t", "r", "b")
    assert CRP(yolo).num_classes == 5
    assert CRP(yolo).box_caveat == BOX_RULES["split"].caveat  # the default's warning holds as measured
    caveat = CRP(yolo, box_rule="lrp0").box_caveat  # measured: its negative side fails on r and b
    assert caveat != BOX_RULES["lrp0"].caveat and "YOLO" in caveat and "does not reliably" in caveat


def test_relprop_detect_writes_yolo_panels_from_a_checkpoint(tmp_path, yolo, capsys):
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    from relprop.cli.main import main

    weights = tmp_path / "yolo.pt"
    torch.save({"arch": "yolov8n", "num_classes": 5, "input_size": SIZE,
                "classes": ["__background__", "a", "b", "c", "d"], "state_dict": yolo.state_dict()}, weights)
    image = tmp_path / "img.png"
    Image.fromarray((random_images(1)[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(image)
    broken = tmp_path / "broken.jpg"  # Ultralytics' PIL.Image.open patch must not turn it into a crash
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    code = main(["detect", str(image), str(broken), "--weights", str(weights), "--out", str(out),
                 "--max-detections", "2", "--score-threshold", "0.0"])
    err = capsys.readouterr().err
    assert code == 1 and "broken.jpg: not an image" in err and "1 of 2 inputs failed" in err, err
    records = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    loaded = build_detector("yolov8n", 5, SIZE)
    loaded.load_state_dict(yolo.state_dict())
    expected = CRP(loaded.eval()).detect([to_tensor(Image.open(image).convert("RGB"))]).detections[0]
    assert len(records) == 2 and [r["anchor"] for r in records] == expected["anchors"][:2].tolist()
    assert all((out / r["panel"]).is_file() for r in records)


def test_images_load_with_pillows_own_open_after_ultralytics_patched_it(tmp_path):
    import PIL.Image

    from relprop.errors import ImageError
    from relprop.images import load_image

    assert PIL.Image.open.__module__ == "ultralytics.utils.patches"  # what importing Ultralytics does
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="broken.png: not an image"):
        load_image(broken)


def test_building_a_yolo_leaves_omp_num_threads_as_it_was():
    """Ultralytics sets OMP_NUM_THREADS=1 at import (every child process would run on one thread)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = ("import os\nfrom relprop.detection.builders import build_detector\n"
            "build_detector('yolov8n', 3, 64)\nprint(os.environ.get('OMP_NUM_THREADS'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "None"


def test_an_end_to_end_head_is_refused_in_one_line():
    """YOLO26's head has no DFL (reg_max 1) and a one-to-one branch for NMS-free inference: its boxes
    are not bins' expectations, so relprop refuses it rather than explain it wrongly."""
    from ultralytics.nn.tasks import DetectionModel

    from relprop.detection.yolo import YOLODetector
    from relprop.errors import ConfigError

    with pytest.raises(ConfigError, match="end-to-end or DFL-free Detect"):
        YOLODetector(DetectionModel("yolo26n.yaml", nc=3, verbose=False))
