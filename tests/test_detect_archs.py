"""`relprop detect --arch NAME`: the detector registry, torchvision's pretrained weights (offline,
from a fake file in a temporary TORCH_HOME), FrozenBatchNorm2d files, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.transforms.functional import to_tensor

from relprop.cli.main import main
from relprop.detection.architectures import ARCHITECTURES, DETECTOR_ARCHS
from relprop.detection.builders import build_detector, frozen_batchnorm
from relprop.detection.crp import CRP, Request
from relprop.models import detector_weights, load_detector

torch.set_num_threads(1)


def _image(folder: Path, size: tuple[int, int] = (96, 128)) -> Path:
    path = folder / "scene.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


def test_help_lists_every_registered_architecture(capsys):
    with pytest.raises(SystemExit):
        main(["detect", "--help"])
    text = capsys.readouterr().out
    for name, arch in ARCHITECTURES.items():
        assert f"  {name}" in text and arch.summary.split(",")[0] in text
    assert set(DETECTOR_ARCHS) >= {"ssd300_vgg16", "ssdlite320_mobilenet_v3_large", "retinanet_resnet50_fpn",
                                   "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "retinanet_resnet18_fpn",
                                   "fcos_resnet18_fpn", "ssd_resnet18"}


@pytest.mark.parametrize("arch", [a for a in DETECTOR_ARCHS if a != "ssd300_vgg16"])  # SSD300: test_crp.py
def test_every_architecture_is_explained_with_torchvision_detections_and_conservation(arch):
    torch.manual_seed(0)
    frozen = ARCHITECTURES[arch].family != "ssd"
    model = build_detector(arch, 5, size=96, frozen=frozen).eval()
    model.score_thresh = 1e-3
    images = [torch.rand(3, 96, 96)]
    with torch.no_grad():
        (reference,) = model(images)
    crp = CRP(model)
    out = crp.detect(images)
    assert len(reference["boxes"]) > 0 and torch.equal(reference["boxes"], out.detections[0]["boxes"])
    plain = crp.explain(out, [Request(0, 0, "class", None, False)])
    assert abs(float(plain.sum()) - 1) < 1e-4  # plain LRP of the logit: conserved to the input
    assert frozen == any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())


def test_default_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch, capsys):
    """`--arch ssdlite320_mobilenet_v3_large --weights DEFAULT --offline`: torchvision's COCO file,
    read from $TORCH_HOME/hub/checkpoints (a random-weight stand-in here), 91 COCO class names."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    named = detector_weights("DEFAULT", "ssdlite320_mobilenet_v3_large")
    assert named.name == "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1"
    assert named.cache_path.is_relative_to(tmp_path / "home")
    torch.manual_seed(0)
    model = build_detector("ssdlite320_mobilenet_v3_large", 91).eval()
    named.cache_path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), named.cache_path)
    image, out = _image(tmp_path), tmp_path / "out"
    code = main(["detect", str(image), "--arch", "ssdlite320_mobilenet_v3_large", "--weights", "DEFAULT",
                 "--offline", "--score-threshold", "0", "--max-detections", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    (record,) = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    with torch.no_grad():
        (reference,) = model([to_tensor(Image.open(image).convert("RGB"))])
    categories = named.weights.meta["categories"]
    assert record["class_name"] == categories[int(reference["labels"][0])]
    assert np.allclose(record["box"], reference["boxes"][0].tolist(), atol=1e-3)
    assert (out / record["panel"]).is_file()


def test_a_frozen_batchnorm_file_is_built_frozen_and_a_batchnorm_file_not(tmp_path):
    torch.manual_seed(0)
    model = build_detector("retinanet_resnet18_fpn", 4, size=96).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    frozen_file, bn_file = tmp_path / "frozen.pth", tmp_path / "bn.pth"
    torch.save(frozen_batchnorm(build_detector("retinanet_resnet18_fpn", 4, size=96)).state_dict(), frozen_file)
    torch.save({"arch": "retinanet_resnet18_fpn", "num_classes": 4, "input_size": 96,
                "state_dict": model.state_dict()}, bn_file)
    frozen, _ = load_detector(frozen_file, arch="retinanet_resnet18_fpn", num_classes=4)
    plain, info = load_detector(bn_file)  # the checkpoint names its arch: no --arch, no --model-def
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules()) == 20
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in plain.modules())
    assert info.arch == "retinanet_resnet18_fpn" and plain.transform.min_size == (96,)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in plain.state_dict().items())


@pytest.mark.parametrize(("argv", "message"), [
    (["--arch", "fcos_resnet18_fpn", "--weights", "DEFAULT"], "torchvision has no pretrained weights"),
    (["--arch", "ssdlite320_mobilenet_v3_large", "--weights", "DEFAULT", "--num-classes", "5"],
     "--num-classes 5: SSDLite320_MobileNet_V3_Large_Weights.COCO_V1 has 91 classes"),
    (["--arch", "fcos_resnet50_fpn", "--weights", "COCO_V9"], "fcos_resnet50_fpn has the weights COCO_V1, DEFAULT"),
    (["--weights", "ResNet50_Weights.DEFAULT"], "not the weights of a detector relprop explains"),
    (["--arch", "retinanet_resnet50_fpn", "--weights", "FCOS_ResNet50_FPN_Weights.COCO_V1"],
     "are fcos_resnet50_fpn's weights, not --arch retinanet_resnet50_fpn's"),
    (["--arch", "fcos_resnet50_fpn", "--weights", "DEFAULT", "--offline"], "not in the torch hub cache"),
    (["--arch", "retinanet_resnet18_fpn", "--weights", "{fcos}"], "a fcos_resnet18_fpn checkpoint, not --arch"),
    (["--arch", "fcos_resnet18_fpn", "--weights", "{fcos}", "--num-classes", "7"], "weights do not fit"),
])
def test_wrong_weights_arch_or_classes_are_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    fcos = tmp_path / "fcos.pt"
    torch.save({"arch": "fcos_resnet18_fpn", "num_classes": 4, "input_size": 64,
                "state_dict": build_detector("fcos_resnet18_fpn", 4, size=64).state_dict()}, fcos)
    argv = [a.replace("{fcos}", str(fcos)) for a in argv]
    code = main(["detect", str(_image(tmp_path)), *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and message in err[0], err
