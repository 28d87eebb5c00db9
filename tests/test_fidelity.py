"""Never silently wrong: relprop explains the function the model computes, or refuses in one line.

Every model here is checked the same way: the input relevance must sum to the probability that
the model *itself* gives (its own forward, not the engine's), else a one-line error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relprop import LRP
from relprop.errors import FidelityError, UnsupportedLayerError

timm = pytest.importorskip("timm")


class ScaledConv(nn.Conv2d):
    """A home-made conv subclass with its own forward: not the computation of nn.Conv2d."""

    def forward(self, x):
        return super().forward(x) * 1.5 + 0.1


class PlainSubclass(nn.Conv2d):
    """A subclass that changes nothing in the computation: built-in handling is right for it."""


def small_net(conv_type: type[nn.Conv2d]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(conv_type(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         conv_type(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5)).eval()


def assert_explains_own_probability(model: nn.Module, x: torch.Tensor, **kwargs) -> None:
    R = LRP(model, **kwargs).attribute(x)
    with torch.no_grad():
        probability = torch.softmax(model(x), 1).max(1).values
    torch.testing.assert_close(R.sum(tuple(range(1, R.dim()))), probability, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("conv_type", [ScaledConv, PlainSubclass])
def test_conv_subclasses_are_explained_as_they_compute(conv_type):
    assert_explains_own_probability(small_net(conv_type), torch.randn(2, 3, 16, 16))


def _randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Random weights with non-trivial BatchNorm statistics, as a trained model has."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model.eval()


@pytest.mark.parametrize("name", ["resnetv2_50", "regnety_008", "resnet50d"])
def test_timm_models_sum_to_their_own_probability(name):
    """resnetv2_50 has weight-standardized StdConv2d, regnety_008 squeeze-excitation gates and
    BatchNormAct2d; relprop 0.1 ran them as plain Conv2d/BatchNorm2d (1.000 vs 0.13)."""
    model = _randomize_batchnorm(timm.create_model(name, pretrained=False, num_classes=10))
    assert_explains_own_probability(model, torch.randn(2, 3, 64, 64))


def test_timm_efficientnet_sums_to_its_own_probability():
    """BatchNormAct2d (BN with SiLU inside, traced into) and squeeze-excitation gates; relprop 0.1
    gave 1.000 where the model said 0.13. SiLU takes the identity rule by default."""
    model = _randomize_batchnorm(timm.create_model("efficientnet_b0", pretrained=False, num_classes=10))
    assert_explains_own_probability(model, torch.randn(1, 3, 64, 64))


def test_a_forward_hook_that_changes_an_output_is_caught_and_named():
    model = small_net(nn.Conv2d)
    handle = model[3].register_forward_hook(lambda module, args, out: out * 3.0)
    try:
        with pytest.raises(FidelityError, match=r"first at module '3' \(Conv2d\)") as info:
            LRP(model).attribute(torch.randn(1, 3, 16, 16))
        assert "\n" not in str(info.value)
    finally:
        handle.remove()


def test_verify_first_checks_each_new_shape_and_always_checks_every_call():
    model = small_net(nn.Conv2d)
    first, always = LRP(model), LRP(model, verify="always")
    x = torch.randn(1, 3, 16, 16)
    first.attribute(x)
    always.attribute(x)
    handle = model[0].register_forward_hook(lambda module, args, out: out + 1.0)
    try:
        first.attribute(x)  # this shape was verified before the hook existed
        with pytest.raises(FidelityError):
            always.attribute(x)
        with pytest.raises(FidelityError):
            first.attribute(torch.randn(1, 3, 20, 20))  # a new shape is verified again
    finally:
        handle.remove()


def test_a_forward_replaced_on_the_instance_is_not_run_as_the_class():
    model = small_net(nn.Conv2d)
    conv = model[3]
    conv.forward = lambda x: F.conv2d(x, conv.weight, conv.bias, padding=1) * 0.5
    with pytest.raises(UnsupportedLayerError, match="'3' \\(Conv2d\\)"):
        LRP(model)


def test_model_in_training_mode_is_explained_in_eval_mode_and_left_as_it_was():
    model = _randomize_batchnorm(timm.create_model("regnety_008", pretrained=False, num_classes=10))
    model.train()
    x = torch.randn(2, 3, 64, 64)
    R = LRP(model).attribute(x)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    with torch.no_grad():
        probability = torch.softmax(model(x), 1).max(1).values
    torch.testing.assert_close(R.sum((1, 2, 3)), probability, rtol=1e-4, atol=1e-6)
