"""load_model builds timm architectures as well as torchvision's (`timm/NAME` or a bare timm name)."""

import pytest
import torch
import torchvision

from relprop.errors import CheckpointError
from relprop.models import build_arch, load_model

timm = pytest.importorskip("timm")


def _save(tmp_path, model, arch, name="m.pt"):
    path = tmp_path / name
    torch.save({"arch": arch, "num_classes": 10, "classes": [f"c{i}" for i in range(10)],
                "input_size": 64, "resize": 64, "crop": None, "mean": [0.5] * 3, "std": [0.25] * 3,
                "state_dict": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("arch", ["timm/convnext_atto", "convnext_atto"])
def test_timm_checkpoint_round_trip(tmp_path, arch):
    torch.manual_seed(0)
    source = timm.create_model("convnext_atto", num_classes=10).eval()
    model, info = load_model(_save(tmp_path, source, arch))
    assert type(model) is type(source) and info.arch == arch and info.preprocessing.resize == 64
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_timm_prefix_picks_timm_where_both_libraries_have_the_name():
    assert isinstance(build_arch("efficientnet_b0", 3), torchvision.models.EfficientNet)
    assert isinstance(build_arch("timm/efficientnet_b0", 3), timm.models.EfficientNet)


def test_plain_state_dict_with_timm_arch(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("regnety_008", num_classes=4).eval()
    path = tmp_path / "plain.pt"
    torch.save(source.state_dict(), path)
    model, info = load_model(path, arch="regnety_008", resize=64)
    assert info.num_classes == 4 and isinstance(model, timm.models.RegNet)


def test_unknown_arch_is_one_line(tmp_path):
    path = _save(tmp_path, torchvision.models.resnet18(num_classes=10), "no_such_net")
    with pytest.raises(CheckpointError, match="unknown architecture 'no_such_net'") as error:
        load_model(path)
    assert "\n" not in str(error.value)
