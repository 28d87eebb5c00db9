"""Loading weights files: checkpoints, plain state dicts, fp16, model definitions, and the one-line
errors for weights that do not fit."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import pytest
import torch
import torchvision
from PIL import Image

from relprop.errors import CheckpointError
from relprop.models import Preprocessing, load_model, preprocessing

from sharedfiles import shared_path


@pytest.fixture(scope="module")
def small_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3).state_dict()


def test_shared_checkpoint_loads_with_its_metadata():
    path = shared_path("models", "resnet18_tin10.pt")
    model, info = load_model(path)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert info.arch == "resnet18" and info.num_classes == 10 and len(info.classes) == 10
    assert info.class_names[0] == "goldfish"
    assert (info.preprocessing.resize, info.preprocessing.crop, info.input_size) == (112, None, 112)
    reference = torchvision.models.resnet18(num_classes=10)
    reference.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.eval()(x))


def test_fp16_checkpoint_is_cast_to_fp32(tmp_path, small_state):
    path = tmp_path / "half.pt"
    torch.save({"arch": "resnet18", "num_classes": 3, "input_size": 64, "resize": 64, "crop": None,
                "mean": [0.5] * 3, "std": [0.25] * 3,
                "state_dict": {k: v.half() if v.is_floating_point() else v for k, v in small_state.items()}},
               path)
    model, info = load_model(path)
    assert model.conv1.weight.dtype == torch.float32
    torch.testing.assert_close(model.conv1.weight, small_state["conv1.weight"].half().float())
    assert info.classes == ["0", "1", "2"] and info.class_names is None


def test_plain_state_dict_with_flags(tmp_path, small_state):
    path = tmp_path / "plain.pth"
    torch.save({f"module.{k}": v for k, v in small_state.items()}, path)  # DataParallel prefix
    model, info = load_model(path, arch="resnet18", resize=80, crop=64)
    assert info.num_classes == 3  # read from fc.weight
    assert (info.preprocessing.resize, info.preprocessing.crop, info.input_size) == (80, 64, 64)
    torch.testing.assert_close(model.fc.weight, small_state["fc.weight"])
    with pytest.raises(CheckpointError, match="needs --arch"):
        load_model(path)


def test_weights_that_do_not_fit_give_one_line(tmp_path, small_state):
    path = tmp_path / "w.pth"
    torch.save(small_state, path)
    with pytest.raises(CheckpointError, match="shape mismatches 2") as error:
        load_model(path, arch="resnet18", num_classes=5)
    assert "\n" not in str(error.value) and "fc.weight" in str(error.value)
    with pytest.raises(CheckpointError, match="missing keys 1 .*unexpected keys 1"):
        broken = dict(small_state)
        broken["extra.weight"] = broken.pop("layer1.0.conv1.weight")
        torch.save(broken, path)
        load_model(path, arch="resnet18")
    with pytest.raises(CheckpointError, match="do not fit resnet34: missing keys"):
        load_model(path, arch="resnet34")


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not weights")
    with pytest.raises(CheckpointError, match="notes.pt: not a PyTorch weights file"):
        load_model(text, arch="resnet18")
    with pytest.raises(CheckpointError, match="no such weights file"):
        load_model(tmp_path / "missing.pt")
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(listing)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"state_dict": _Payload()}))
    with pytest.raises(CheckpointError):
        load_model(path, arch="resnet18")
    assert "code ran" not in capsys.readouterr().out


def test_model_definition_file_builds_the_shared_detector():
    source = shared_path("models", "ssd_resnet18_tin10.py")
    model, info = load_model(shared_path("models", "ssd_resnet18_tin10.pt"),
                             model_def=f"{source}:from_metadata")
    assert type(model).__name__ == "SSD" and not model.training
    assert info.num_classes == 11 and info.preprocessing.resize == 112
    with pytest.raises(CheckpointError, match="has no function 'nope'"):
        load_model(shared_path("models", "ssd_resnet18_tin10.pt"), model_def=f"{source}:nope")


def test_preprocessing_resizes_crops_and_normalizes():
    spec = Preprocessing(resize=256, crop=224, mean=[0.5] * 3, std=[0.5] * 3)
    x = preprocessing(spec)(Image.new("RGB", (500, 375), (255, 0, 0)))
    assert x.shape == (3, 224, 224)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    x = preprocessing(replace(spec, crop=None, resize=112))(Image.new("RGB", (64, 64)))
    assert x.shape == (3, 112, 112)


def test_plain_state_dict_preprocessing_is_stated_and_settable(tmp_path, capsys):
    """#9 item 2: explain takes --resize/--crop/--mean/--std, and says what it assumed without them."""
    from relprop.cli.main import main

    checkpoint = torch.load(shared_path("models", "resnet18_tin10.pt"), weights_only=True)
    plain = tmp_path / "plain.pth"
    torch.save(checkpoint["state_dict"], plain)
    koala = shared_path("data", "tin10", "val", "n01882714", "val_6748.JPEG")

    def explain(out, *options):
        assert main(["explain", str(koala), "--methods", "gradcam", "--device", "cpu",
                     "--out", str(tmp_path / out), *options]) == 0
        (record,) = [json.loads(line) for line in (tmp_path / out / "predictions.jsonl").open()]
        return record, capsys.readouterr().err

    reference, err = explain("ckpt", "--weights", str(shared_path("models", "resnet18_tin10.pt")))
    assert "note:" not in err
    _, err = explain("assumed", "--weights", str(plain), "--arch", "resnet18")
    assert (f"relprop explain: note: {plain} does not say how to preprocess; assumed Resize 256 -> "
            "CenterCrop 224, ImageNet mean/std (set --resize, --crop, --mean, --std to change it)"
            in err)
    stated = ["--resize", str(checkpoint["resize"]), "--crop", "0",
              "--mean", *map(str, checkpoint["mean"]), "--std", *map(str, checkpoint["std"])]
    record, err = explain("stated", "--weights", str(plain), "--arch", "resnet18", *stated)
    assert "note:" not in err
    assert (record["pred"], record["prob"]) == (reference["pred"], reference["prob"])


def test_detect_and_evaluate_share_the_model_options():
    from relprop.cli.main import build_parser

    parser = build_parser()
    for command in ("explain", "evaluate", "detect"):
        args = parser.parse_args([command, "x.jpg", "--offline", "--classes", "imagenet",
                                  "--weights", "w.pt", "--out", "o"] if command != "evaluate" else
                                 [command, "--data", "d", "--offline", "--classes", "imagenet",
                                  "--weights", "w.pt", "--out", "o"])
        assert args.offline and args.classes == "imagenet"
    args = parser.parse_args(["evaluate", "--data", "d", "--out", "o", "--resize", "112", "--crop", "0"])
    assert (args.weights, args.default_weights, args.resize, args.crop) == (
        None, "ResNet50_Weights.IMAGENET1K_V1", 112, 0)


def test_classes_file_names_the_classes_of_a_plain_state_dict(tmp_path, small_state):
    from relprop.cli.common import read_classes

    listing = tmp_path / "classes.tsv"
    listing.write_text("# my classes\nn01\tant, emmet\nn02\tbee\nn03\tcow\n")
    path = tmp_path / "plain.pth"
    torch.save(small_state, path)
    ids, names = read_classes(str(listing))
    _, info = load_model(path, arch="resnet18", classes=ids, class_names=names)
    assert (info.classes, info.class_names) == (["n01", "n02", "n03"], ["ant", "bee", "cow"])
    with pytest.raises(CheckpointError, match="2 class ids for a model with 3 classes"):
        load_model(path, arch="resnet18", classes=["a", "b"])
    assert read_classes("imagenet")[1][:2] == ["tench", "goldfish"]
