"""LRP-0 equals gradient × input on piecewise-linear ReLU networks (Ancona et al., ICLR 2018): with
the z-rule everywhere, the signed split at adds (both unstabilized: ε = 0), winner-takes-all max pooling and the explained
logit as the seed, the ratio R/z at every layer is the gradient. An independent reference for the
whole walk through linear, pass-through, pooling, routing and add ops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from relprop.core.rules import Rule

from references import gradient_times_input, lrp0


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


class Subtractions(nn.Module):
    """PoolFormer's token mixer `pool(x) - x` and a subtraction with `alpha=`: each a sum of scaled
    terms that the split must see as such."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.pool = nn.Conv2d(3, 6, 3, padding=1), nn.AvgPool2d(3, 1, 1)
        self.mix, self.head = nn.Conv2d(6, 6, 1), nn.Linear(6, 5)

    def forward(self, x):
        h = self.stem(x)  # no ReLU before the mixer: exact zeros would make LRP-0's 0/0 there
        h = h + (self.pool(h) - h)
        h = torch.relu(torch.sub(h, self.mix(h), alpha=0.5))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("build", [PlainResidual, vgg_like, Subtractions])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lrp0_is_gradient_times_input(build, seed):
    torch.manual_seed(seed)
    model = build().eval()
    x = torch.randn(3, 3, 16, 16)
    R = lrp0(model, x, maxpool="wta")
    expected = gradient_times_input(model, x)
    # float32 rounding through z-rule divisions: worst 2.2e-5 of the largest value over 20 seeds;
    # a wrong rule or route is O(1) (z+ here: 0.99)
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


class BatchNormZ(Rule):
    """The z-rule of an eval-mode BatchNorm, an elementwise affine map y = s·x + t: R_x = s·x / y · R
    (written here from the definition, independently of relprop's folding)."""

    def relevance(self, layer, a, R):
        scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
        scale = scale.reshape(1, -1, *([1] * (a.dim() - 2)))
        y = nn.functional.batch_norm(a, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0,
                                     layer.eps)
        return scale * a * R / y


class BatchNormBothSides(nn.Module):
    """BatchNorm after a conv (conv→BN), directly before a conv (ReLU→BN→conv, padded), inside a
    residual block, and before the classifier (BN1d→linear): both folds of `bn="fold"`."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn, self.pool = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.MaxPool2d(2)
        self.pre_bn, self.a1 = nn.BatchNorm2d(6), nn.Conv2d(6, 6, 3, padding=1)
        self.a2, self.a2_bn = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.head_bn, self.head = nn.BatchNorm1d(6), nn.Linear(6, 5)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem_bn(self.stem(x))))
        x = torch.relu(x + self.a2_bn(self.a2(torch.relu(self.a1(self.pre_bn(x))))))
        return self.head(self.head_bn(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


def _randomize_batchnorms(model: nn.Module) -> nn.Module:
    """Statistics and affine parameters away from the identity (scales of both signs), so a
    BatchNorm handled wrongly changes the map."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            channels = module.num_features
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                module.weight.copy_(torch.randn(channels))
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _lrp0_and_gradient_times_input(model: nn.Module, x: torch.Tensor, bn: str) -> tuple[torch.Tensor, torch.Tensor]:
    # bn="pass": relevance crosses BatchNorm by its own z-rule instead of being folded
    rules = {nn.BatchNorm1d: BatchNormZ(), nn.BatchNorm2d: BatchNormZ()} if bn == "pass" else {}
    return lrp0(model, x, rules, maxpool="wta", bn=bn), gradient_times_input(model, x)


@pytest.mark.parametrize("bn", ["pass", "fold"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lrp0_is_gradient_times_input_with_batchnorm_before_and_after(bn, seed):
    torch.manual_seed(seed)
    model = _randomize_batchnorms(BatchNormBothSides())
    x = torch.randn(3, 3, 16, 16)
    R, expected = _lrp0_and_gradient_times_input(model, x, bn)
    # the BatchNorm before a layer read at its output instead of its input (the fold's old bug) is O(1)
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
    assert (model[:3](x) == 0).any()  # the case: exact zeros at the bias-free conv's output
    R, expected = _lrp0_and_gradient_times_input(model, x, "fold")
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


class DeadSum(nn.Module):
    """Two ReLU branches added (Res2Net's `sp + spx[i]`): where both are dead the add's operands are
    both 0, the signed split's a / (a + b) is 0/0."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.head(torch.flatten(torch.relu(self.a(x)) + torch.relu(self.b(x)), 1))


def test_lrp0_where_both_operands_of_an_add_are_zero():
    torch.manual_seed(0)
    model = DeadSum().eval()
    with torch.no_grad():
        model.a.bias.fill_(-3.0)
        model.b.bias.fill_(-3.0)
    x = torch.randn(2, 3, 8, 8)
    assert ((torch.relu(model.a(x)) + torch.relu(model.b(x))) == 0).any()  # the case
    R, expected = _lrp0_and_gradient_times_input(model, x, "fold")
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


class GroupNormNet(nn.Module):
    """conv → GroupNorm → ReLU → conv → linear; `functional` spells the norm as `F.group_norm` with
    the module's parameters (what a timm or custom block does); `detached` holds its std constant
    by autograd, `(x − mean) / std.detach() · w + b`: the reference, written without relprop."""

    def __init__(self, functional: bool = False, detached: bool = False) -> None:
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.conv, self.head = nn.Conv2d(8, 6, 3, padding=1), nn.Linear(6 * 4 * 4, 5)
        self.functional, self.detached = functional, detached

    def normalize(self, h: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        if self.functional:
            return nn.functional.group_norm(h, norm.num_groups, norm.weight, norm.bias, norm.eps)
        if not self.detached:
            return norm(h)
        groups = h.reshape(h.shape[0], norm.num_groups, -1)
        std = (groups.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt().detach()
        centred = ((groups - groups.mean(-1, keepdim=True)) / std).reshape(h.shape)
        return centred * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)

    def forward(self, x):
        h = torch.relu(self.normalize(self.stem(x)))
        return self.head(torch.flatten(self.conv(h), 1))


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lrp0_with_norm_epsilon_on_groupnorm_is_gradient_times_input_with_std_detached(functional, seed):
    """GroupNorm taken as the linear map it is with its std held constant (`norm-epsilon` at ε = 0):
    LRP-0 through it is gradient x input of the net whose GroupNorm std is detached (the identity
    rule there, relprop's default, is not)."""
    from relprop.core.rules import NormEpsilonRule

    torch.manual_seed(seed)
    model = GroupNormNet(functional).eval()
    with torch.no_grad():
        model.norm.weight.copy_(torch.randn(8))
        model.norm.bias.uniform_(-0.5, 0.5)
    reference = GroupNormNet(detached=True).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 4, 4)
    R = lrp0(model, x, {nn.GroupNorm: NormEpsilonRule(0.0)})
    expected = gradient_times_input(reference, x)
    torch.testing.assert_close(R, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert not torch.allclose(lrp0(model, x), expected, atol=1e-2 * float(expected.abs().max()))
