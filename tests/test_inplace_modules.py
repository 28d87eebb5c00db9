"""Modules that compute in place (`nn.Hardswish(inplace=True)`, timm's default in MobileNetV3's
head) must not change what the engine recorded for their input: the ε rule reads a linear
layer's recorded output as its denominator, and an in-place activation after it used to
overwrite that output (cp-lrp's sums doubled at MobileNetV3's `conv_head`)."""

import pytest
import timm
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

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


class _CloneCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.clones = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.clones += func is torch.ops.aten.clone.default
        return func(*args, **(kwargs or {}))


def test_an_in_place_relu_is_computed_out_of_place_without_a_copy():
    """The engine runs ReLU as `F.relu` (out of place): copying its input first, as for an
    in-place module it calls, would be a wasted pass over every activation. The recorded input
    keeps its negative values, and the map equals the out-of-place model's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x = torch.randn(1, 3, 9, 9)
    explainer = relprop.LRP(model, composite=relprop.get_composite("cp-lrp"))
    explainer.attribute(x, target=1)
    counter = _CloneCounter()
    with counter:
        values = explainer.engine.forward(x, keep="all").values
    assert counter.clones == 0
    conv = next(step.node for step in explainer.engine.steps if step.node.target == "0")
    assert float(values[conv].min()) < 0
    model[1].inplace = False
    reference = relprop.LRP(model, composite=relprop.get_composite("cp-lrp")).attribute(x, target=1)
    torch.testing.assert_close(explainer.attribute(x, target=1), reference, rtol=0, atol=0)
