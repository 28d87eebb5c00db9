"""`relprop detect` end to end: detections drawn, panels written, anchors logged, errors on one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from ssd_helpers import SHARED_BUILDER, SHARED_DETECTOR, tin10_images, tiny_ssd

from relprop.cli.main import main
from relprop.detection.crp import OUTPUTS

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parent


@pytest.fixture()
def tiny_checkpoint(tmp_path: Path) -> tuple[Path, str]:
    """A relprop checkpoint of the tiny SSD and a --model-def file that builds it."""
    model = tiny_ssd(num_classes=4)
    checkpoint = {
        "arch": "tiny_ssd", "num_classes": 4, "input_size": 64,
        "classes": ["__background__", "n1", "n2", "n3"],
        "class_names": ["__background__", "cat", "dog", "lemon"],
        "state_dict": {k: v.half() for k, v in model.state_dict().items()},
    }
    weights = tmp_path / "tiny.pt"
    torch.save(checkpoint, weights)
    builder = tmp_path / "tiny_def.py"
    builder.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from ssd_helpers import tiny_ssd\n\n"
        "def from_metadata(meta):\n"
        "    return tiny_ssd(num_classes=meta['num_classes'])\n"
    )
    return weights, f"{builder}:from_metadata"


def _images(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (48 + 16 * i, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]


def test_detect_writes_panels_for_capped_detections(tmp_path, tiny_checkpoint, capsys):
    weights, model_def = tiny_checkpoint
    images = _images(tmp_path, 2)
    out = tmp_path / "out"
    code = main(["detect", *map(str, images), "--weights", str(weights), "--model-def", model_def,
                 "--score-threshold", "0", "--max-detections", "2", "--save-maps", "--out", str(out)])
    assert code == 0
    records = _records(out)
    assert [r["output"] for r in records] == ["img0", "img0", "img1", "img1"]
    for record in records:
        folder = out / record["output"]
        assert (out / record["panel"]).stat().st_size > 0
        assert (folder / "detections.png").exists()
        assert record["class_name"] in {"cat", "dog", "lemon"}
        for name in OUTPUTS:
            heat = np.load(folder / f"det{record['detection']}_{name}.npy")
            h, w = Image.open(tmp_path / f"{record['output']}.png").size[::-1]
            assert heat.shape == (h, w) and np.isfinite(heat).all() and np.abs(heat).sum() > 0
    assert "#0" in capsys.readouterr().out


def test_detect_box_rule_reaches_the_maps_and_the_panel_caption(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """--box-rule lrp0 gives other box maps than the default and prints its own caveat under them
    (the default's says the blue side does not push the other way); class maps are unchanged (up to
    float rounding: the box requests no longer share their chunks)."""
    import relprop.pipelines.detect as pipeline
    from relprop.detection.box_rules import BOX_RULES

    weights, model_def = tiny_checkpoint
    images = _images(tmp_path, 1)
    captions = []
    panel = pipeline.save_detection_panel
    monkeypatch.setattr(pipeline, "save_detection_panel",
                        lambda *args, **kwargs: captions.append(args[-1]) or panel(*args, **kwargs))
    maps = {}
    for rule in ("split", "lrp0"):
        out = tmp_path / rule
        assert main(["detect", *map(str, images), "--weights", str(weights), "--model-def", model_def,
                     "--score-threshold", "0", "--max-detections", "1", "--save-maps", "--box-rule", rule,
                     "--out", str(out)]) == 0
        maps[rule] = {name: np.load(out / "img0" / f"det0_{name}.npy") for name in OUTPUTS}
    assert captions == [BOX_RULES["split"].caveat, BOX_RULES["lrp0"].caveat]
    assert np.allclose(maps["split"]["class"], maps["lrp0"]["class"], atol=1e-6 * np.abs(maps["split"]["class"]).max())
    assert not np.allclose(maps["split"]["cx"], maps["lrp0"]["cx"])
    with pytest.raises(SystemExit):
        main(["detect", str(images[0]), "--weights", str(weights), "--box-rule", "gradient"])
    assert "invalid choice: 'gradient'" in capsys.readouterr().err


def test_detect_what_if_and_bad_inputs(tmp_path, tiny_checkpoint, capsys):
    weights, model_def = tiny_checkpoint
    good = _images(tmp_path, 1)[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    code = main(["detect", str(good), str(broken), "--weights", str(weights), "--model-def",
                 model_def, "--score-threshold", "0", "--max-detections", "1",
                 "--target-class", "lemon", "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "1 of 2 inputs failed" in err
    (record,) = _records(out)
    assert record["explained_class"] == 3
    code = main(["detect", str(good), "--weights", str(weights), "--model-def", model_def,
                 "--target-class", "zebra", "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zebra" in err[0]


def test_detect_ssdlite_mobilenet(tmp_path):
    """SSDLite-MobileNetV3: Hardswish passes relevance, squeeze-excitation gates keep it."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3
    )
    weights = tmp_path / "lite.pth"
    torch.save(model.state_dict(), weights)
    image = _images(tmp_path, 1)[0]
    out = tmp_path / "o"
    code = main(["detect", str(image), "--weights", str(weights), "--arch", "ssdlite320_mobilenet_v3_large",
                 "--num-classes", "3", "--score-threshold", "0", "--max-detections", "1", "--out", str(out)])
    assert code == 0
    assert list(out.glob("*/det0.png"))
    assert (out / "detections.jsonl").read_text().strip()


def test_detect_on_shared_detector(tmp_path):
    if not SHARED_DETECTOR.exists():
        pytest.skip(f"shared detector not found at {SHARED_DETECTOR}")
    images = tin10_images(2)
    out = tmp_path / "out"
    code = main(["detect", *map(str, images), "--weights", str(SHARED_DETECTOR), "--model-def",
                 f"{SHARED_BUILDER}:from_metadata", "--score-threshold", "0.2",
                 "--max-detections", "1", "--out", str(out)])
    assert code == 0
    records = _records(out)
    assert 1 <= len(records) <= 2
    for record in records:
        assert record["score"] >= 0.2 and 0 <= record["level"] < 5
        assert (out / record["panel"]).exists()


def test_detect_help_reads_like_a_manual(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["detect", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("--model-def", "--score-threshold", "det<i>.png", "exit status", "cx, cy"):
        assert phrase in text


def test_evaluate_detection_task_keeps_every_method_name(tmp_path, tiny_checkpoint, capsys):
    """`relprop evaluate --task detection --methods crp,lrp-plain,gradcam` evaluates all three
    (lrp-plain used to be dropped silently: detection called it lrp)."""
    from ssd_helpers import detection_dataset

    weights, model_def = tiny_checkpoint
    model = tiny_ssd(num_classes=4)
    data = tmp_path / "data"
    data.mkdir()
    classes = detection_dataset(data, model, count=3)
    checkpoint = torch.load(weights, weights_only=True)
    checkpoint["classes"] = classes
    torch.save(checkpoint, weights)
    assert main(["evaluate", "--task", "detection", "--weights", str(weights), "--model-def", model_def,
                 "--data", str(data), "--out", str(tmp_path / "eval"), "--limit", "2",
                 "--methods", "crp,lrp-plain,gradcam", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["images"] == 2 and summary["true_positives"] == 2
    assert list(summary["methods"]) == ["crp", "lrp-plain", "gradcam"]
    assert "| lrp-plain |" in capsys.readouterr().out


def test_evaluate_detection_task_refuses_an_unknown_method(tmp_path, tiny_checkpoint, capsys):
    weights, model_def = tiny_checkpoint
    assert main(["evaluate", "--task", "detection", "--weights", str(weights), "--model-def", model_def,
                 "--data", str(tmp_path), "--out", str(tmp_path / "eval"),
                 "--methods", "crp,lrp,gradcam"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["relprop evaluate: error: unknown detection method 'lrp'; --task detection "
                   "knows: crp, lrp-plain, gradcam, gradxinput"]
