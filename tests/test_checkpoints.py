"""relprop.save_checkpoint writes what relprop.load_model reads (docs/checkpoints.md): a round trip
keeps the outputs bit for bit and every metadata field; the shared tin10 checkpoint still loads."""

from __future__ import annotations

import pytest
import torch
import torchvision

import relprop
from relprop.checkpoints import CHECKPOINT_KEYS
from relprop.errors import CheckpointError
from relprop.modelinfo import Preprocessing

from sharedfiles import shared_path

CLASSES = ["n01", "n02", "n03"]


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a lost buffer shows in the outputs
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def test_round_trip_keeps_outputs_and_metadata(tmp_path, small):
    spec = Preprocessing(resize=72, crop=64, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    path = relprop.save_checkpoint(small, tmp_path / "m.pt", classes=CLASSES, preprocessing=spec,
                                   class_names=["a", "b", "c"], val_acc=0.5)
    stored = torch.load(path, weights_only=True)
    assert list(stored)[: len(CHECKPOINT_KEYS) - 1] == list(CHECKPOINT_KEYS[:-1])
    assert stored["arch"] == "resnet18" and stored["val_acc"] == 0.5  # found from the shapes
    model, info = relprop.load_model(path)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(x), small(x))
    assert (info.arch, info.num_classes, info.classes, info.class_names) == ("resnet18", 3, CLASSES,
                                                                              ["a", "b", "c"])
    assert info.preprocessing == spec and info.input_size == 64 and info.assumed == ()
    assert not any(name.startswith(".") for name in (p.name for p in tmp_path.iterdir()))  # no temporary


def test_shared_checkpoint_survives_a_round_trip(tmp_path):
    model, info = relprop.load_model(shared_path("models", "resnet18_tin10.pt"))
    assert info.arch == "resnet18" and info.num_classes == 10 and info.class_names[1] == "koala"
    path = relprop.save_checkpoint(model, tmp_path / "tin10.pt", classes=info.classes,
                                   class_names=info.class_names, preprocessing=info)
    again, info_again = relprop.load_model(path)
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    keys = ("arch", "num_classes", "classes", "class_names", "preprocessing", "input_size")
    assert all(getattr(info_again, k) == getattr(info, k) for k in keys)


def test_a_dict_preprocessing_and_a_timm_model(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", num_classes=3).eval()
    path = relprop.save_checkpoint(model, tmp_path / "t.pt", classes=CLASSES,
                                   preprocessing={"resize": 64, "crop": None})
    loaded, info = relprop.load_model(path)
    assert info.arch == "timm/resnet10t" and info.preprocessing.crop is None
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_refuses_what_would_not_load(tmp_path, small):
    spec = Preprocessing(resize=64)
    with pytest.raises(CheckpointError, match="resnet34 with 3 classes does not take"):
        relprop.save_checkpoint(small, tmp_path / "m.pt", classes=CLASSES, preprocessing=spec,
                                arch="resnet34")
    with pytest.raises(CheckpointError, match=r"fc.weight \(3, 512\) vs model \(4, 512\)"):
        relprop.save_checkpoint(small, tmp_path / "m.pt", classes=[*CLASSES, "n04"], preprocessing=spec)
    with pytest.raises(CheckpointError, match="cannot tell the architecture of Net; pass arch="):
        relprop.save_checkpoint(Net(), tmp_path / "m.pt", classes=CLASSES, preprocessing=spec)
    with pytest.raises(CheckpointError, match="state_dict are set by the other arguments"):
        relprop.save_checkpoint(small, tmp_path / "m.pt", classes=CLASSES, preprocessing=spec,
                                **{"arch": "resnet18", "state_dict": {}})
    assert list(tmp_path.iterdir()) == []  # nothing written


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
