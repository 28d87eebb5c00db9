"""Modules that compute in place (`nn.Hardswish(inplace=True)`, timm's default in MobileNetV3's
head) must not change what the engine recorded for their input: the ε rule reads a linear
layer's recorded output as its denominator, and an in-place activation after it used to
overwrite that output (cp-lrp's sums doubled at MobileNetV3's `conv_head`)."""

import pytest
import timm
import torch
from torch import nn

import relprop


def _head(inplace: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.Hardswish(inplace=inplace),
                         nn.Conv2d(8, 6, 1, bias=False), nn.SiLU(inplace=inplace),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4, bias=False)).eval()


@pytest.mark.parametrize("method", ["cp-lrp", "lrp-plain"])
def test_in_place_activation_gives_the_out_of_place_map(method):
    x = torch.randn(2, 3, 9, 9)
    maps = []
    for inplace in (False, True):
        model = _head(inplace)
        maps.append(relprop.get_method(method, model).attribute(x, target=1))
    torch.testing.assert_close(maps[1], maps[0], rtol=0, atol=0)


def test_in_place_activation_conserves_under_epsilon():
    """Without biases, cp-lrp (ε on every layer) conserves: the input total equals the explained
    probability (cp-lrp explains the softmax output, as LXT does)."""
    model = _head(True)
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        explained = model(x).softmax(1)[0, 1].item()
    explanation = relprop.get_method("cp-lrp", model).attribute(x, target=1)
    assert explanation.sum().item() == pytest.approx(explained, rel=1e-4)


def test_mobilenetv3_head_conserves_under_cp_lrp():
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_100", num_classes=10).eval()
    assert model.act2.inplace  # the case: a 1×1 conv_head, then Hardswish in place
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "bias", None), nn.Parameter):
                module.bias.zero_()
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()
    x = torch.randn(1, 3, 64, 64)
    _, sums = relprop.get_method("cp-lrp", model).attribute(x, target=0, return_layer_sums=True)
    top = float(sums["act2"])  # ε's small losses over signed sums stay under 1 %; the bug was 2×
    assert float(sums["conv_head"]) == pytest.approx(top, rel=5e-3)
    assert float(sums["input"]) == pytest.approx(top, rel=5e-3)
