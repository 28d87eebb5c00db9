"""Each rule on tiny hand-computed cases, and against a slow matrix-form re-implementation
built from the layer's Jacobian (so it cannot share a bug with the transposed-op code)."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relprop.core.rules import (
    AlphaBetaRule,
    EpsilonRule,
    GammaRule,
    GroupNormParams,
    NormEpsilonRule,
    ZBRule,
    get_rule,
)


def linear(weight, bias=None) -> nn.Linear:
    weight = torch.tensor(weight, dtype=torch.float32)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return layer


# --- hand-computed ----------------------------------------------------------------------

def test_zplus_by_hand():
    # contributions a_i w+_i = (1*2, 2*1, 3*0) = (2, 2, 0): relevance 6 splits 3 / 3 / 0
    R = get_rule("zplus").relevance(linear([[2.0, 1.0, -4.0]], [5.0]), torch.tensor([[1.0, 2.0, 3.0]]),
                                    torch.tensor([[6.0]]))
    torch.testing.assert_close(R, torch.tensor([[3.0, 3.0, 0.0]]))


def test_epsilon_by_hand_loses_what_the_bias_takes():
    # z = 1*2 + 2*1 + 1 (bias) = 5; R_i = a_i w_i / z * 5 = (2, 2)
    R = EpsilonRule(epsilon=0.0).relevance(linear([[2.0, 1.0]], [1.0]), torch.tensor([[1.0, 2.0]]),
                                           torch.tensor([[5.0]]))
    torch.testing.assert_close(R, torch.tensor([[2.0, 2.0]]))


def test_gamma_by_hand():
    # w + 0.5 w+ = (3, -1); z = 3*1 + (-1)*1 = 2; R = (3, -1) / 2 * 4 = (6, -2)
    R = GammaRule(gamma=0.5, epsilon=0.0).relevance(linear([[2.0, -1.0]]), torch.tensor([[1.0, 1.0]]),
                                                    torch.tensor([[4.0]]))
    torch.testing.assert_close(R, torch.tensor([[6.0, -2.0]]))


def test_alpha2beta1_by_hand():
    # positive part (3, 0) -> (1, 0)·R ; negative part (0, -1) -> (0, 1)·R ; 2·pos − 1·neg
    R = AlphaBetaRule(2.0, 1.0).relevance(linear([[3.0, -1.0]]), torch.tensor([[1.0, 1.0]]),
                                          torch.tensor([[1.0]]))
    torch.testing.assert_close(R, torch.tensor([[2.0, -1.0]]))


def test_zb_by_hand():
    # x = (0.5, 0.5), l = 0, h = 1, w = (1, -1):
    # z_i = x w - l w+ - h w- = (0.5, -0.5 + 1) = (0.5, 0.5) -> R split evenly
    rule = ZBRule(low=0.0, high=1.0)
    R = rule.relevance(linear([[1.0, -1.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0]]))
    torch.testing.assert_close(R, torch.tensor([[1.0, 1.0]]))


def test_norm_epsilon_on_groupnorm_by_hand():
    """4 channels, 2 groups, 1x1: a = (1, 3 | 2, −2), means (2 | 0), stds (1 | 2) (eps 0), w = (1, 2,
    1, −1), b = (0, 1, 0, 0.5): z = (−1, 3, 1, 1.5). With R = z, s = R/z = 1, u = w/std = (1, 2 | ½,
    −½), centred (−½, ½ | ½, −½), R_in = a·that = (−½, 3/2, 1, 1): each group's z minus its bias
    (1 | 2); the biases keep 1.5. The functional call's arguments give the same."""
    norm = nn.GroupNorm(2, 4, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 1.0, -1.0]))
        norm.bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.5]))
    a = torch.tensor([1.0, 3.0, 2.0, -2.0]).view(1, 4, 1, 1)
    z = norm(a)
    assert torch.allclose(z.flatten(), torch.tensor([-1.0, 3.0, 1.0, 1.5]))
    expected = torch.tensor([-0.5, 1.5, 1.0, 1.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(NormEpsilonRule(0.0).relevance(norm, a, z), expected)
    params = GroupNormParams(2, norm.weight, norm.bias, 0.0)
    torch.testing.assert_close(NormEpsilonRule(0.0).relevance(params, a, z), expected)


def test_flat_w2_wplus_by_hand():
    layer, a, R = linear([[3.0, -1.0]]), torch.tensor([[7.0, 9.0]]), torch.tensor([[4.0]])
    torch.testing.assert_close(get_rule("flat").relevance(layer, a, R), torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(get_rule("w2").relevance(layer, a, R), torch.tensor([[3.6, 0.4]]))
    torch.testing.assert_close(get_rule("wplus").relevance(layer, a, R), torch.tensor([[4.0, 0.0]]))


def test_zplus_negative_inputs_use_negative_weights():
    # a = (-1, 2), w = (-3, 1): positive contributions: (-1)(-3) = 3 and 2*1 = 2
    R = get_rule("zplus").relevance(linear([[-3.0, 1.0]]), torch.tensor([[-1.0, 2.0]]), torch.tensor([[5.0]]))
    torch.testing.assert_close(R, torch.tensor([[3.0, 2.0]]))


# --- matrix form from the Jacobian -----------------------------------------------------

def conv_matrix(conv: nn.Conv2d, shape, weight=None) -> torch.Tensor:
    """(outputs x inputs) matrix of the bias-free convolution, weight optionally replaced."""
    weight = conv.weight if weight is None else weight
    fn = lambda x: F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)  # noqa: E731
    jacobian = torch.autograd.functional.jacobian(fn, torch.zeros(shape))
    out_numel = fn(torch.zeros(shape)).numel()
    return jacobian.reshape(out_numel, -1).detach()


# A stabilizer large enough that ε and γ are well conditioned in float32 (with ε → 0 they
# divide by near-cancelling sums, and any two summation orders disagree).
STABILIZER = 0.25


def matrix_rule(name, conv, a, R, low=None, high=None):
    """Rules written from their definitions, in matrix form (zennit-style reference)."""
    J = conv_matrix(conv, a.shape)
    Jp, Jn = J.clamp(min=0), J.clamp(max=0)
    x, r = a.reshape(-1), R.reshape(-1)
    bias = conv.bias.detach().repeat_interleave(r.numel() // conv.out_channels)

    def normalize(Z, denominator=None):
        z = Z.sum(1) if denominator is None else denominator
        return (Z / z[:, None] * r[:, None]).nan_to_num(0.0).sum(0)

    if name == "zplus":
        return normalize(x.clamp(min=0) * Jp + x.clamp(max=0) * Jn)
    if name == "wplus":
        return normalize(Jp)
    if name == "w2":
        return normalize(J ** 2)
    if name == "flat":
        return normalize(conv_matrix(conv, a.shape, torch.ones_like(conv.weight)))
    if name == "epsilon":
        Z = x * J
        z = Z.sum(1) + bias
        return normalize(Z, z + STABILIZER * torch.where(z >= 0, 1.0, -1.0))
    if name == "gamma":  # generalized (Andeol et al. 2021): favour contributions of the output's sign
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        z_out = (x * J).sum(1) + bias
        total = torch.zeros(x.shape[0])
        for mask, favour, other, b in ((z_out > 0, Jp, Jn, bias.clamp(min=0)),
                                       (z_out < 0, Jn, Jp, bias.clamp(max=0))):
            Z = xp * (J + 0.25 * favour) + xn * (J + 0.25 * other)
            z = Z.sum(1) + bias + 0.25 * b
            z = z + STABILIZER * torch.where(z >= 0, 1.0, -1.0)
            total = total + (Z / z[:, None] * (r * mask)[:, None]).sum(0)
        return total
    if name in ("alpha1beta0", "alpha2beta1"):
        alpha, beta = (1.0, 0.0) if name == "alpha1beta0" else (2.0, 1.0)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        return alpha * normalize(xp * Jp + xn * Jn) - beta * normalize(xp * Jn + xn * Jp)
    if name == "zb":
        return normalize(x * J - low.reshape(-1) * Jp - high.reshape(-1) * Jn)
    raise ValueError(name)


@pytest.mark.parametrize("name", ["zplus", "wplus", "w2", "flat", "epsilon", "gamma", "alpha1beta0",
                                  "alpha2beta1", "zb"])
@pytest.mark.parametrize("geometry", [dict(stride=1, padding=1), dict(stride=2, padding=0),
                                      dict(stride=2, padding=1, groups=2)])
def test_rule_matches_matrix_definition(name, geometry):
    generator = torch.Generator().manual_seed(zlib.crc32(f"{name}{sorted(geometry.items())}".encode()))
    conv = nn.Conv2d(4, 6, 3, bias=True, **geometry)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator))
    a = torch.randn(1, 4, 6, 7, generator=generator)
    if name not in ("zplus", "alpha1beta0", "alpha2beta1", "epsilon", "zb", "gamma"):
        a = a.clamp(min=0)
    R = torch.randn(conv(a).shape, generator=generator)
    mean, std = [0.4, 0.5, 0.45, 0.5], [0.25, 0.2, 0.22, 0.3]
    rule = {"epsilon": EpsilonRule(STABILIZER), "gamma": GammaRule(0.25, STABILIZER)}.get(name) \
        or get_rule(name, mean=mean, std=std)
    low = torch.zeros_like(a) + rule.low if name == "zb" else None
    high = torch.zeros_like(a) + rule.high if name == "zb" else None
    if name == "zb":  # inside the box, as real normalized pixels are
        a = low + (high - low) * torch.rand(a.shape, generator=generator)
    ours = rule.relevance(conv, a, R).reshape(-1)
    expected = matrix_rule(name, conv, a, R, low, high)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_unknown_rule_and_missing_bounds_are_clear():
    with pytest.raises(ValueError, match="unknown rule 'zplu'"):
        get_rule("zplu")
    with pytest.raises(ValueError, match="mean=... and std"):
        get_rule("zb")
