"""lrp-contrastive: seeds and heads on hand-computed cases, and linearity on a residual net."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from relprop import LRP
from relprop.errors import InputError
from relprop.methods import get_method
from relprop.methods.contrastive import ContrastiveLRP, contrast_seed


def tiny() -> nn.Module:
    """x (2,) -> identity layer -> ReLU -> fc with class weights [1, 0], [1, 1], [-1, 2] (no biases).

    The identity input layer passes relevance unchanged under w⁺ (only diagonal weights), so the
    input map is the relevance of the hidden units h = x.
    """
    first, fc = nn.Linear(2, 2, bias=False), nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        fc.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 2.0]]))
    return nn.Sequential(first, nn.ReLU(), fc).eval()


X = torch.tensor([[1.0, 2.0]])  # h = (1, 2), logits z = (1, 3, 3)


def test_mean_seed_is_class_minus_mean_of_others():
    seed = contrast_seed(torch.zeros(2, 3), torch.tensor([0, 2]), "mean")
    assert torch.allclose(seed, torch.tensor([[1.0, -0.5, -0.5], [-0.5, -0.5, 1.0]]))


def test_sglrp_seed_is_the_softmax_gradient():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    y = torch.softmax(logits, 1)[0]
    seed = contrast_seed(logits, torch.tensor([0]), "sglrp")[0]
    expected = torch.stack([y[0] * (1 - y[0]), -y[0] * y[1], -y[0] * y[2]])
    assert torch.allclose(seed, expected)
    # the same as autograd's gradient of p_0 w.r.t. the logits
    z = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.softmax(z, 1)[0, 0], z)
    assert torch.allclose(seed, grad[0])


def test_rules_head_hand_computed():
    # z+ at fc normalizes each class's positive contributions: class 0: (1, 0)/1, class 1:
    # (1, 2)/3, class 2 (weight -1 ignored): (0, 4)/4. Seed (1, -1/2, -1/2):
    # R = (1 - 1/6 - 0, 0 - 1/3 - 1/2) = (5/6, -5/6): positive and negative evidence, total 0.
    R = ContrastiveLRP(tiny(), seed="mean", head="rules").attribute(X, target=0)
    assert torch.allclose(R, torch.tensor([[5 / 6, -5 / 6]]), atol=1e-6)


def test_contribution_head_hand_computed():
    # feature i gets h_i * sum_c w_ci s_c: (1 * (1 - 1/2 + 1/2), 2 * (0 - 1/2 - 1)) = (1, -3),
    # which sums to the logit contrast z_0 - mean(z_1, z_2) = 1 - 3 = -2.
    R = ContrastiveLRP(tiny(), seed="mean", head="contribution").attribute(X, target=0)
    assert torch.allclose(R, torch.tensor([[1.0, -3.0]]), atol=1e-5)


def test_clrp_hand_computed():
    # target map (1, 0); dual = mean of the other classes' maps ((1/3, 2/3) + (0, 1)) / 2 = (1/6, 5/6);
    # both of total 1; max(0, difference) = (5/6, 0)
    R = ContrastiveLRP(tiny(), seed="clrp").attribute(X, target=0)
    assert torch.allclose(R, torch.tensor([[5 / 6, 0.0]]), atol=1e-6)


def test_contribution_head_refuses_logits_not_from_a_linear():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU()).eval()
    with torch.no_grad():  # logits -3, 0, 3 before the ReLU: it changes them
        model[0].weight.copy_(torch.tensor([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]]))
        model[0].bias.zero_()
    with pytest.raises(InputError, match="does not produce the logits"):
        ContrastiveLRP(model, seed="mean", head="contribution").attribute(X)


def test_unknown_options_are_refused():
    with pytest.raises(InputError, match="unknown seed"):
        ContrastiveLRP(tiny(), seed="nope")
    with pytest.raises(InputError, match="unknown head"):
        ContrastiveLRP(tiny(), head="nope")
    with pytest.raises(InputError, match="head='rules' only"):
        ContrastiveLRP(tiny(), seed="clrp", head="contribution")


def test_mean_seed_and_default_clrp_from_per_class_lrp_on_a_resnet():
    """On a residual net the mean-seed map is R_k - mean_{j != k} R_j, each R_c the paper's LRP
    seeded with 1 at class c alone (an independent computation), and its total is 0; the default
    (CLRP) is max(0, R_k / ΣR_k - D / ΣD) with D that mean of the other classes' maps."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    target = [1, 3]
    R = get_method("lrp-contrastive", model, seed="mean").attribute(x, target=target)
    lrp = LRP(model)
    per_class = torch.stack([lrp.attribute(x, target=torch.eye(4)[c].expand(2, 4).contiguous())
                             for c in range(4)])  # (4, N, 3, H, W)
    dual = torch.stack([per_class[[c for c in range(4) if c != k], n].mean(0) for n, k in enumerate(target)])
    own = torch.stack([per_class[k, n] for n, k in enumerate(target)])
    expected = own - dual
    clrp = get_method("lrp-contrastive", model).attribute(x, target=target)
    unit = [m / m.flatten(1).sum(1)[:, None, None, None] for m in (own, dual)]
    assert torch.allclose(clrp, (unit[0] - unit[1]).clamp(min=0), atol=1e-4 * float(unit[0].abs().max()))
    # float32 differences of per-class maps: tolerance relative to those maps' scale
    assert torch.allclose(R, expected, rtol=1e-3, atol=1e-4 * float(per_class.abs().max()))
    totals = R.flatten(1).sum(1)
    assert bool((totals.abs() < 1e-3 * R.flatten(1).abs().sum(1)).all())
    # the runner-up's map is not the top-1's map: the contrast depends on the class
    other = get_method("lrp-contrastive", model, seed="mean").attribute(x, target=[0, 2])
    assert not torch.allclose(R, other)
