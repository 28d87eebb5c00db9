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


class _Aliases(nn.Module):
    """A BatchNorm output read again after an alias of it (nn.Identity) meets a ReLU, and a
    ReLU after a residual add: only memory no later step reads may be handed to a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.alias = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Identity()
        self.mid, self.mid_bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        with torch.no_grad():
            for bn in (self.bn, self.mid_bn):
                bn.running_mean.normal_(0, 0.5)
                bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn(self.conv(x))
        b = torch.relu(self.alias(a))  # the alias dies here; `a` does not
        c = torch.relu(self.mid_bn(self.mid(b)))  # the BatchNorm output dies here: handed over
        d = self.mid_bn(self.mid(c))
        view = d.flatten(2)  # a view of `d` that lives on after `d` dies at its ReLU
        e = torch.relu(d)
        return self.head(torch.relu(c + a + e)) + view.mean((1, 2))[:, None]  # the sum dies: handed over


@pytest.mark.parametrize("method", ["lrp-split", "cp-lrp"])
def test_a_relu_takes_over_only_memory_nothing_else_reads(method, monkeypatch):
    """The recording forward computes a ReLU in place where its input is a fresh value (a
    BatchNorm's or an add's output) that no later step and not the walk reads; the map and
    layer sums are those of out-of-place ReLUs, bit for bit, and the alias is left alone."""
    from relprop.core.interpreter import RelevanceEngine
    from relprop.core.ops.passthrough import Passthrough

    model, x = _Aliases().eval(), torch.randn(2, 3, 12, 12)
    handed = []
    original = Passthrough.record_in_place

    def counted(self, step, args, kwargs):
        output = original(self, step, args, kwargs)
        if output is not None:
            handed.append(step.node.name)
        return output

    monkeypatch.setattr(Passthrough, "record_in_place", counted)
    explainer = relprop.LRP(model, composite=relprop.get_composite(method))
    ours, our_sums = explainer.attribute(x, target=1, return_layer_sums=True)
    handed.clear()
    explainer.engine.forward(x)  # the forward the walk reads (the first call also ran the audit's)
    assert "relu" not in handed and "relu_2" not in handed  # an alias of `a`; `d` with a view of it
    assert "relu_3" in handed and ("relu_1" in handed) == (method == "lrp-split")  # ε reads BN outputs
    monkeypatch.setattr(RelevanceEngine, "_hands_over", lambda self, step, dying: False)
    theirs, their_sums = relprop.LRP(model, composite=relprop.get_composite(method)).attribute(
        x, target=1, return_layer_sums=True)
    assert torch.equal(ours, theirs)
    assert our_sums.keys() == their_sums.keys() and all(torch.equal(our_sums[k], their_sums[k]) for k in our_sums)
