"""LRP-0 equals gradient × input on piecewise-linear ReLU networks (Ancona et al., ICLR 2018): with
the z-rule everywhere, the signed split at adds (both unstabilized: ε = 0), winner-takes-all max pooling and the explained
logit as the seed, the ratio R/z at every layer is the gradient. An independent reference for the
whole walk through linear, pass-through, pooling, routing and add ops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from relprop import LRP
from relprop.core.rules import EpsilonRule
from relprop.core.splitting import SignedSplit


class PlainResidual(nn.Module):
    """conv, ReLU, max pool, two residual blocks (one identity skip, one 1x1 projection), average
    pooling, flatten, linear: every op a ResNet uses, without BatchNorm (folding is float32 rounding
    at near-zero denominators, not this identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.pool = nn.Conv2d(3, 6, 3, padding=1), nn.MaxPool2d(2)
        self.a1, self.a2 = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.project, self.head = nn.Conv2d(6, 8, 1, stride=2), nn.Linear(8, 5)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        x = torch.relu(x + self.a2(torch.relu(self.a1(x))))
        x = torch.relu(self.project(x) + self.b2(torch.relu(self.b1(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def vgg_like() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                         nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(),
                         nn.Dropout(), nn.Linear(16, 5))


@pytest.mark.parametrize("build", [PlainResidual, vgg_like])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lrp0_is_gradient_times_input(build, seed):
    torch.manual_seed(seed)
    model = build().eval()
    x = torch.randn(3, 3, 16, 16)
    inputs = x.clone().requires_grad_(True)
    logits = model(inputs)
    explained = logits.argmax(1, keepdim=True)
    (gradient,) = torch.autograd.grad(logits.gather(1, explained).sum(), inputs)
    seed_relevance = torch.zeros_like(logits).scatter(1, explained, logits.gather(1, explained)).detach()
    z_rule = EpsilonRule(0.0)
    R = LRP(model, rules={nn.Conv2d: z_rule, nn.Linear: z_rule}, input_rule=z_rule, split=SignedSplit(epsilon=0.0),
            maxpool="wta").attribute(x, target=seed_relevance)
    expected = gradient * x
    # float32 rounding through z-rule divisions: worst 2.2e-5 of the largest value over 20 seeds;
    # a wrong rule or route is O(1) (z+ here: 0.99)
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_lrp0_at_dead_units_is_zero_not_nan():
    """A bias-free conv reading an all-zero window (after a ReLU) outputs exactly 0 there: LRP-0's
    R/z is then 0/0, where the gradient × input identity needs 0 (its relevance is 0 anyway)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, bias=False),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    with torch.no_grad():
        model[0].bias.fill_(-5.0)  # most of the first layer's units are dead: zero windows downstream
    x = torch.randn(2, 3, 8, 8)
    inputs = x.clone().requires_grad_(True)
    logits = model(inputs)
    assert (model[:3](x) == 0).any()  # the case: exact zeros at the bias-free conv's output
    explained = logits.argmax(1, keepdim=True)
    (gradient,) = torch.autograd.grad(logits.gather(1, explained).sum(), inputs)
    seed_relevance = torch.zeros_like(logits).scatter(1, explained, logits.gather(1, explained)).detach()
    z_rule = EpsilonRule(0.0)
    R = LRP(model, rules={nn.Conv2d: z_rule, nn.Linear: z_rule}, input_rule=z_rule).attribute(x, target=seed_relevance)
    expected = gradient * x
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
