"""Rules go where they say: precedence (name > input_rule > type > default), keys that are
functions or tensor-method names, default rules for upsampling, and error advice that works
when followed literally."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relprop import LRP
from relprop.core.rules import FlatRule, GammaRule, ZBRule
from relprop.errors import UnsupportedLayerError


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()


def first_conv_rule(lrp: LRP):
    step = next(step for step in lrp.engine.steps if getattr(step.info, "is_input_layer", False))
    return lrp.engine.rule_for(step)


MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def test_input_rule_wins_over_type_rules_and_names_win_over_both():
    model = conv_net()
    composite = {nn.Conv2d: "gamma", nn.Linear: "epsilon"}
    assert isinstance(first_conv_rule(LRP(model, rules=composite, input_rule="zb", mean=MEAN, std=STD)), ZBRule)
    assert isinstance(first_conv_rule(LRP(model, rules=composite)), GammaRule)  # no input_rule given
    named = LRP(model, rules={**composite, "0": "flat"}, input_rule="zb", mean=MEAN, std=STD)
    assert isinstance(first_conv_rule(named), FlatRule)


def test_input_rule_changes_the_map_as_documented():
    """relprop 0.1 ignored input_rule when a type rule matched the first layer."""
    model, x = conv_net(), torch.rand(2, 3, 12, 12)
    composite = {nn.Conv2d: "gamma", nn.Linear: "epsilon"}
    with_flat = LRP(model, rules=composite, input_rule="flat").attribute(x)
    by_name = LRP(model, rules={**composite, "0": "flat"}).attribute(x)
    plain = LRP(model, rules=composite).attribute(x)
    torch.testing.assert_close(with_flat, by_name)
    assert not torch.allclose(with_flat, plain, atol=1e-6)


class Upsampling(nn.Module):
    def __init__(self, mode: str, functional: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode=mode)
        self.mode, self.functional = mode, functional
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = F.interpolate(h, scale_factor=2, mode=self.mode) if self.functional else self.up(h)
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("functional", [True, False])
def test_nearest_and_bilinear_upsampling_conserve_by_default(mode, functional):
    torch.manual_seed(0)
    model, x = Upsampling(mode, functional).eval(), torch.randn(2, 3, 8, 8)
    R = LRP(model).attribute(x)
    with torch.no_grad():
        probability = torch.softmax(model(x), 1).max(1).values
    torch.testing.assert_close(R.sum((1, 2, 3)), probability, rtol=1e-4, atol=1e-6)


def test_upsampling_relevance_follows_the_interpolation_weights():
    """Linear 2x upsampling of [1, 3] (align_corners) gives [1, 5/3, 7/3, 3]: the two middle
    outputs mix the inputs 2:1 and 1:2. With relevance 1 per output, by hand:
    R_0 = 1 + (2/3)/(5/3) + (1/3)/(7/3) = 1 + 2/5 + 1/7, R_1 = 4 - R_0."""
    from relprop.core.rules import proportional

    a = torch.tensor([[[1.0, 3.0]]])
    R = proportional(lambda t: F.interpolate(t, scale_factor=2, mode="linear", align_corners=True),
                     a, torch.ones(1, 1, 4))
    r0 = 1 + 2 / 5 + 1 / 7
    torch.testing.assert_close(R, torch.tensor([[[r0, 4 - r0]]]))


class WithSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).softmax(dim=1)


def test_softmax_at_the_output_says_to_remove_it():
    with pytest.raises(UnsupportedLayerError, match="remove that softmax") as info:
        LRP(WithSoftmax())
    assert "\n" not in str(info.value)


class Sine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(x.sin())


class Erf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.erf(x))


class Softplus(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act, self.fc = nn.Softplus(), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.act(x))


def _key_from_advice(message: str):
    """The rule key exactly as the error prints it: a quoted method name or a dotted path."""
    written = re.search(r"rules=\{(.+?): rule\}", message).group(1)
    if written.startswith("'"):
        return written.strip("'")
    module, _, name = written.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("model, rule, x", [
    (Sine(), "pass", torch.randn(2, 6)),
    (Erf(), "pass", torch.randn(2, 6)),
    (Softplus(), "pass", torch.randn(2, 6)),
])
def test_every_unsupported_layer_advice_works_when_followed(model, rule, x):
    with pytest.raises(UnsupportedLayerError) as info:
        LRP(model.eval())
    key = _key_from_advice(str(info.value))
    R = LRP(model.eval(), rules={key: rule}).attribute(x)
    assert torch.isfinite(R).all() and R.shape == x.shape


def test_unknown_rule_keys_are_refused():
    with pytest.raises(ValueError, match="neither a module type"):
        LRP(conv_net(), rules={"no_such_layer": "flat"})
