"""BatchNorm canonization: the folded layer computes exactly what layer+BatchNorm compute, and
with it the z-dependent composites agree with Zennit (which folds the same way)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from relprop import LRP, get_composite
from relprop.core.linear_op import BatchNormStats, as_linear_op, fold_batchnorm
from relprop.errors import ConfigError

from sharedfiles import SHARED, load_torchvision_checkpoint, shared_path


def random_bn(channels: int, dims: int, generator: torch.Generator) -> nn.Module:
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](channels)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels, generator=generator))  # some scales negative
        bn.bias.copy_(torch.randn(channels, generator=generator))
        bn.running_mean.copy_(torch.randn(channels, generator=generator))
        bn.running_var.copy_(torch.rand(channels, generator=generator) + 0.1)
    return bn.eval()


LAYERS = [
    (lambda: nn.Conv1d(4, 6, 3, padding=1, stride=2), 1),
    (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), 2),
    (lambda: nn.Conv3d(4, 6, 3, padding=1, bias=False), 3),
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1), 2),
]


@pytest.mark.parametrize("make, dims", LAYERS)
def test_folding_after_a_layer_is_exact(make, dims):
    generator = torch.Generator().manual_seed(dims)
    layer, bn = make().eval(), random_bn(6, dims, generator)
    x = torch.randn(2, 4, *([7] * dims), generator=generator)
    op = fold_batchnorm(as_linear_op(layer), BatchNormStats.of(bn))
    with torch.no_grad():
        torch.testing.assert_close(op.forward(x, op.weight, op.bias), bn(layer(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, dims", LAYERS[:3])
def test_folding_before_a_padded_layer_is_exact_at_the_borders(make, dims):
    """BN→conv: the padding sees zeros, not the BN shift, so the folded bias is a map."""
    generator = torch.Generator().manual_seed(10 + dims)
    layer, bn = make().eval(), random_bn(4, dims, generator)
    x = torch.randn(2, 4, *([7] * dims), generator=generator)
    op = fold_batchnorm(as_linear_op(layer), BatchNormStats.of(bn), before=True, input_shape=x.shape)
    with torch.no_grad():
        torch.testing.assert_close(op.forward(x, op.weight, op.bias), layer(bn(x)), rtol=1e-5, atol=1e-5)


def test_folding_before_a_linear_layer_is_exact():
    generator = torch.Generator().manual_seed(3)
    layer, bn = nn.Linear(5, 3), random_bn(5, 1, generator)
    x = torch.randn(4, 5, generator=generator)
    op = fold_batchnorm(as_linear_op(layer), BatchNormStats.of(bn), before=True, input_shape=x.shape)
    with torch.no_grad():
        torch.testing.assert_close(op.forward(x, op.weight, op.bias), layer(bn(x)), rtol=1e-5, atol=1e-5)


def test_bn_mode_defaults_to_pass_for_the_papers_composite_and_fold_otherwise():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    assert LRP(model).engine.bn == "pass"
    assert LRP(model, rules={nn.Conv2d: "gamma"}).engine.bn == "fold"
    assert LRP(model, input_rule="zb", mean=[0.5] * 3, std=[0.2] * 3).engine.bn == "fold"
    with pytest.raises(ValueError, match="reference preset"):
        LRP(model, preset="reference", bn="fold")


def test_pre_activation_bn_before_a_conv_is_folded_and_conserves_with_zplus():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), random_bn(6, 2, torch.Generator().manual_seed(5)),
                          nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 3)).eval()
    lrp = LRP(model, bn="fold")
    assert next(s for s in lrp.engine.steps if s.node.target == "3").info.fold_before is not None
    x = torch.randn(2, 3, 10, 10)
    R = lrp.attribute(x)
    with torch.no_grad():
        probability = torch.softmax(model(x), 1).max(1).values
    torch.testing.assert_close(R.sum((1, 2, 3)), probability, rtol=1e-4, atol=1e-6)


# --- against Zennit on the trained tin10 ResNet-18 -------------------------------------------

zennit = pytest.importorskip("zennit")


@pytest.fixture(scope="module")
def tin10_batch():
    from PIL import Image
    from torchvision import transforms

    path = shared_path("models", "resnet18_tin10.pt")
    meta = torch.load(path, weights_only=True)
    steps = transforms.Compose([transforms.Resize(meta["resize"]), transforms.ToTensor(),
                                transforms.Normalize(meta["mean"], meta["std"])])
    files = sorted((SHARED / "data" / "tin10" / "val").glob("*/*.JPEG"))[::60][:4]
    x = torch.stack([steps(Image.open(f).convert("RGB")) for f in files])
    return load_torchvision_checkpoint(path), x, meta


def _zennit_relevance(model, x, composite):
    from zennit.attribution import Gradient

    with torch.no_grad():
        probabilities = torch.softmax(model(x), 1)
    seed = torch.zeros_like(probabilities)
    rows, classes = torch.arange(len(x)), probabilities.argmax(1)
    seed[rows, classes] = probabilities[rows, classes]
    with Gradient(model, composite) as attributor:
        _, R = attributor(x.clone().requires_grad_(True), seed)
    return R


def _pearson(a, b):
    a, b = a.sum(1).flatten(1), b.sum(1).flatten(1)
    return torch.tensor([float(torch.corrcoef(torch.stack([u, v]))[0, 1]) for u, v in zip(a, b, strict=True)])


def test_epsilon_plus_flat_agrees_with_zennit(tin10_batch):
    """Aligned conventions: relprop's bias-free z+ is Zennit's ZPlus(zero_params='bias'), its
    signed split is Zennit's Sum rule, maxpool='wta' is Zennit's default for max pooling."""
    from zennit.composites import EpsilonPlusFlat
    from zennit.rules import ZPlus
    from zennit.torchvision import ResNetCanonizer
    from zennit.types import Convolution

    model, x, _ = tin10_batch
    composite = EpsilonPlusFlat(layer_map=[(Convolution, ZPlus(zero_params="bias"))], canonizers=[ResNetCanonizer()])
    theirs = _zennit_relevance(model, x, composite)
    ours = LRP(model, split="signed", maxpool="wta", rules={nn.Conv2d: "zplus", nn.Linear: "epsilon"},
               input_rule="flat").attribute(x)
    assert torch.isfinite(ours).all()
    assert _pearson(ours, theirs).min() >= 0.99
    torch.testing.assert_close(ours.sum((1, 2, 3)), theirs.sum((1, 2, 3)), rtol=1e-3, atol=1e-5)


def test_epsilon_gamma_box_agrees_with_zennit_and_stays_bounded(tin10_batch):
    from zennit.composites import EpsilonGammaBox
    from zennit.torchvision import ResNetCanonizer

    model, x, meta = tin10_batch
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    composite = EpsilonGammaBox(low=(0 - mean) / std, high=(1 - mean) / std, canonizers=[ResNetCanonizer()])
    theirs = _zennit_relevance(model, x, composite)
    lrp = LRP(model, split="signed", maxpool="wta", rules={nn.Conv2d: "gamma", nn.Linear: "epsilon"},
              input_rule="zb", mean=meta["mean"], std=meta["std"])
    assert lrp.engine.bn == "fold"
    ours = lrp.attribute(x)
    assert torch.isfinite(ours).all()
    assert _pearson(ours, theirs).min() >= 0.99
    spread = ours.abs().sum((1, 2, 3)) / ours.sum((1, 2, 3)).abs()
    assert spread.max() < 2.0  # bounded maps (relprop 0.1: 1.3e8)


def _calibrated(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine parameters away from their identity defaults; half the
    scales negative (z+ and αβ are invariant to a positive per-channel scale, so only a negative
    one shows whether a BatchNorm was folded)."""
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5).mul_(torch.tensor([1.0, -1.0]).repeat(3))
            module.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


@pytest.mark.parametrize("composite", ["epsilon-plus-flat", "alpha2beta1"])
def test_timm_batchnorm_act_is_folded_as_a_batchnorm_and_its_activation(composite):
    """timm's BatchNormAct2d reads its input's `ndim` before the batch norm; a shape read is no
    value read, so bn="fold" folds it as it folds BatchNorm2d followed by the activation (the same
    function, built from torch layers): before, the extra reader left it unfolded, silently."""
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    conv1, conv2, head = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Linear(6, 4)
    fused = nn.Sequential(conv1, timm_layers.BatchNormAct2d(6), conv2, timm_layers.BatchNormAct2d(6),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    _calibrated(fused)
    plain = nn.Sequential(conv1, nn.BatchNorm2d(6), nn.ReLU(), conv2, nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()
    for bn_act, bn in ((fused[1], plain[1]), (fused[3], plain[4])):
        bn.load_state_dict({k: v for k, v in bn_act.state_dict().items() if k in bn.state_dict()})
    x = torch.rand(3, 3, 12, 12)
    torch.testing.assert_close(fused(x), plain(x))
    assert get_composite(composite).bn == "fold"
    expected = LRP(plain, composite=get_composite(composite)).attribute(x)
    actual = LRP(fused, composite=get_composite(composite)).attribute(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


def test_a_rule_by_name_for_a_layer_relprop_traces_into_is_refused_not_ignored():
    """A rule keyed by the name of timm's BatchNormAct2d never reached its inner F.batch_norm
    (the map was the default's, silently); now refused in one line."""
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    model = _calibrated(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), timm_layers.BatchNormAct2d(6),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)))
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ConfigError, match=r"rule for module '1' \(BatchNormAct2d\) would never apply") as info:
        LRP(model, rules={"1": "zplus"}).attribute(x)
    assert "\n" not in str(info.value)
    LRP(model, rules={nn.Conv2d: "zplus"}).attribute(x)  # rules that reach their layers still apply
