"""Every supported model runs and conserves; custom layers can be given rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from relprop import LRP, RelevanceEngine
from relprop.core.ops.attention import ConservativeAttention
from relprop.errors import UnsupportedLayerError


def assert_conserves(sums: dict, rtol: float = 1e-4) -> None:
    for name, total in sums.items():
        torch.testing.assert_close(total, sums["output"], rtol=rtol, atol=1e-8, msg=name)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                  "resnext50_32x4d", "wide_resnet50_2"])
def test_torchvision_resnets_conserve_at_odd_sizes(arch):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=5).eval()
    x = torch.randn(1, 3, 45, 59)  # odd sizes: the reference's 2x2 max-pool stand-in breaks here
    R, sums = LRP(model).attribute(x, return_layer_sums=True)
    assert R.shape == x.shape and torch.isfinite(R).all()
    assert_conserves(sums)
    blocks = [name for name in sums if name.startswith("layer")]
    expected = [f"layer{stage}.{index}" for stage in (4, 3, 2, 1)
                for index in reversed(range(len(getattr(model, f"layer{stage}"))))]
    assert blocks == expected


def test_layer_sums_keys_of_resnet18_run_from_output_to_input(resnet18_tin10):
    _, sums = LRP(resnet18_tin10).attribute(torch.randn(1, 3, 64, 64), return_layer_sums=True)
    assert list(sums) == ["output", "fc", "avgpool", "layer4.1", "layer4.0", "layer3.1", "layer3.0",
                          "layer2.1", "layer2.0", "layer1.1", "layer1.0", "maxpool", "relu", "bn1",
                          "conv1", "input"]


class FunctionalNet(nn.Module):
    """Functional ops, views, concatenation, dropout, identity and an average-pool module."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.left = nn.Conv2d(6, 4, 3, padding=1)
        self.right = nn.Conv2d(6, 4, 1)
        self.pool = nn.AvgPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.identity = nn.Identity()
        self.fc1 = nn.Linear(8 * 4, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.max_pool2d(x, 2)
        x = torch.cat([F.relu(self.left(x)), torch.relu(self.right(x))], dim=1)
        x = self.identity(self.pool(x))
        x = F.adaptive_avg_pool2d(x, (2, 2))
        x = x.view(x.size(0), -1)
        x = self.drop(F.relu(self.fc1(x)))
        return self.fc2(x.reshape(x.shape[0], -1))


def test_functional_model_with_concatenation_conserves():
    torch.manual_seed(1)
    model = FunctionalNet().train()  # dropout must be off and BN frozen whatever the mode
    x = torch.randn(3, 3, 16, 16)
    R, sums = LRP(model).attribute(x, return_layer_sums=True)
    assert_conserves(sums)
    again = LRP(model).attribute(x)
    assert torch.equal(R, again)  # no dropout randomness


class MeanHeadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def test_global_mean_head_conserves():
    _, sums = LRP(MeanHeadNet()).attribute(torch.randn(2, 3, 9, 9), return_layer_sums=True)
    assert_conserves(sums)


class Scale(nn.Module):
    """A custom layer relprop does not know."""

    def forward(self, x):
        return x * 2.0 if x.dim() == 4 else x


class WithCustom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.GELU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def test_custom_module_gets_a_rule_by_type():
    model = WithCustom()
    R, sums = LRP(model, rules={nn.GELU: "pass"}).attribute(torch.randn(2, 3, 8, 8), return_layer_sums=True)
    assert torch.isfinite(R).all()
    torch.testing.assert_close(sums["input"], sums["output"], rtol=1e-4, atol=0)


def test_rules_by_name_override_the_composite():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(1, 3, 40, 40)
    default = LRP(model).attribute(x)
    flat_fc = LRP(model, rules={"fc": "flat"}).attribute(x)
    epsilon_linear = LRP(model, rules={nn.Linear: "epsilon"}).attribute(x)
    assert not torch.allclose(default, flat_fc)
    assert not torch.allclose(default, epsilon_linear)


def test_engine_seeds_a_dict_output():
    class TwoMaps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 2, 3, padding=1)
            self.b = nn.Conv2d(2, 2, 3, stride=2, padding=1)

        def forward(self, x):
            first = F.relu(self.a(x))
            return {"high": first, "low": F.relu(self.b(first))}

    engine = RelevanceEngine(TwoMaps())
    x = torch.randn(1, 3, 8, 8).abs()
    record = engine.forward(x)
    seed_high = torch.rand_like(record.output["high"]) * (record.output["high"] > 0)
    seed_low = torch.rand_like(record.output["low"]) * (record.output["low"] > 0)
    both = engine.backward(record, {"high": seed_high, "low": seed_low}).input
    separate = engine.backward(record, {"high": seed_high}).input + engine.backward(record, {"low": seed_low}).input
    torch.testing.assert_close(both, separate)  # fan-in sums both paths; the rules are linear in R
    torch.testing.assert_close(both.sum(), seed_high.sum() + seed_low.sum(), rtol=1e-4, atol=0)


def test_squeeze_excitation_gates_keep_relevance_with_the_signal():
    """MobileNetV3: `x * hardsigmoid(fc(pool(x)))` gates get no relevance, so their layers
    need no rule; the Hardswish activations on the main path take the identity rule."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    R, sums = LRP(model).attribute(x, return_layer_sums=True)
    assert torch.isfinite(R).all()
    assert_conserves(sums)


def test_product_of_unrelated_tensors_takes_the_uniform_rule_or_is_refused_on_request():
    """`a(x) * b(x)`: the graph cannot tell a gate, so the default takes the uniform rule (half to
    each factor: docs/rules.md, gated products) and conserves; `ambiguous="refuse"` refuses."""
    class Bilinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(4, 3)

        def forward(self, x):
            return self.a(x) * self.b(x)

    torch.manual_seed(0)
    model, x = Bilinear().eval(), torch.randn(2, 4)
    R, sums = LRP(model).attribute(x, return_layer_sums=True)
    assert_conserves(sums)
    with pytest.raises(UnsupportedLayerError, match="two unrelated input-dependent tensors"):
        LRP(model, attention=ConservativeAttention(ambiguous="refuse")).attribute(x)
