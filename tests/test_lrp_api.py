"""The public LRP API: targets, batching, devices, dtypes, and leaving the model alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

from relprop import LRP, heat_quantize
from relprop.errors import InputError, TargetError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=6).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(5, 3, 48, 48, generator=torch.Generator().manual_seed(3))


def test_samples_are_independent_and_chunking_changes_nothing(model, images):
    whole = LRP(model, chunk_size=64).attribute(images)
    chunked = LRP(model, chunk_size=2).attribute(images)
    single = torch.cat([LRP(model).attribute(images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(whole, chunked, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(whole, single, rtol=1e-5, atol=1e-10)


def test_bitwise_deterministic_on_cpu(model, images):
    lrp = LRP(model)
    assert torch.equal(lrp.attribute(images), lrp.attribute(images))


def test_target_forms(model, images):
    lrp = LRP(model)
    logits = model(images)
    probabilities = logits.softmax(1)
    predicted = logits.argmax(1)
    R_none, sums = lrp.attribute(images, return_layer_sums=True)
    torch.testing.assert_close(sums["output"], probabilities[torch.arange(5), predicted])
    torch.testing.assert_close(R_none, lrp.attribute(images, target=predicted))
    torch.testing.assert_close(R_none, lrp.attribute(images, target=predicted.tolist()))
    R_two = lrp.attribute(images, target=2)
    torch.testing.assert_close(R_two.sum((1, 2, 3)), probabilities[:, 2], rtol=1e-4, atol=0)


def test_custom_seed_is_linear(model, images):
    lrp = LRP(model)
    seed_a = torch.rand(5, 6)
    seed_b = torch.rand(5, 6)
    R_a, R_b = lrp.attribute(images, target=seed_a), lrp.attribute(images, target=seed_b)
    R_ab = lrp.attribute(images, target=seed_a + seed_b)
    torch.testing.assert_close(R_ab, R_a + R_b, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(R_ab.sum((1, 2, 3)), (seed_a + seed_b).sum(1), rtol=1e-4, atol=0)


def test_model_is_not_modified():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).train()
    before = copy.deepcopy(model.state_dict())
    LRP(model).attribute(torch.randn(2, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # BN running stats too
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in model.modules())


def test_train_mode_model_is_explained_in_eval_semantics():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    R_train_mode = LRP(model.train()).attribute(x)
    R_eval_mode = LRP(model.eval()).attribute(x)
    torch.testing.assert_close(R_train_mode, R_eval_mode)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_explained_in_fp32(dtype):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    half = copy.deepcopy(model).to(dtype)
    R = LRP(half).attribute(x.to(dtype))
    assert R.dtype == torch.float32
    assert next(half.parameters()).dtype == dtype
    R_reference = LRP(model).attribute(x)
    cosine = torch.nn.functional.cosine_similarity(R.flatten(1), R_reference.flatten(1))
    assert (cosine > 0.9).all()  # only the rounding of the weights differs


@pytest.mark.parametrize("split,identity_skips", [("ratio", True), ("ratio", False),
                                                  ("symmetric", True), ("symmetric", False)])
def test_split_variants_differ_and_conserve(model, images, split, identity_skips):
    R, sums = LRP(model, split=split, identity_skips=identity_skips).attribute(images[:2], return_layer_sums=True)
    torch.testing.assert_close(sums["input"], sums["output"], rtol=1e-4, atol=0)
    if (split, identity_skips) != ("ratio", True):
        assert not torch.allclose(R, LRP(model).attribute(images[:2]))


def test_plain_lrp_signed_split_runs(model, images):
    R = LRP(model, split="signed").attribute(images[:2])
    assert R.shape == images[:2].shape and torch.isfinite(R).all()


def test_zb_input_rule_with_normalization(model, images):
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    R, sums = LRP(model, input_rule="zb", mean=mean, std=std).attribute(images[:2], return_layer_sums=True)
    torch.testing.assert_close(sums["input"], sums["output"], rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="mean=... and std"):
        LRP(model, input_rule="zb")


def test_bad_targets_are_clear(model, images):
    lrp = LRP(model)
    with pytest.raises(TargetError, match="target 6 is out of range for a model with 6 outputs"):
        lrp.attribute(images, target=6)
    with pytest.raises(TargetError, match="target -1 is out of range"):
        lrp.attribute(images, target=-1)
    with pytest.raises(TargetError, match="got 2 targets for 5 inputs"):
        lrp.attribute(images, target=[0, 1])
    with pytest.raises(TargetError, match=r"with 6 outputs, got 3 columns"):
        lrp.attribute(images, target=torch.rand(5, 3))
    with pytest.raises(TargetError, match=r"seed must have shape \(N, num_outputs\), got \(5,\)"):
        lrp.attribute(images, target=torch.rand(5))
    with pytest.raises(TargetError, match="got 4 targets for 5 inputs"):
        lrp.attribute(images, target=torch.rand(4, 6))
    with pytest.raises(TargetError, match="class index"):
        lrp.attribute(images, target=True)


def test_bad_inputs_are_clear(model):
    lrp = LRP(model)
    with pytest.raises(InputError, match="floating-point"):
        lrp.attribute(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(InputError, match="non-empty batch"):
        lrp.attribute(torch.zeros(0, 3, 32, 32))
    with pytest.raises(InputError, match="torch.Tensor"):
        lrp.attribute([[0.0]])
    with pytest.raises(InputError, match=r"cannot run on inputs of shape \(1, 4, 32, 32\): at 'conv1'") as info:
        lrp.attribute(torch.zeros(1, 4, 32, 32))
    assert "\n" not in str(info.value)


def test_bad_options_are_clear(model):
    with pytest.raises(ValueError, match="unknown split 'half'"):
        LRP(model, split="half")
    with pytest.raises(ValueError, match="unknown preset"):
        LRP(model, preset="paper")


def test_heat_quantize_by_hand():
    heatmap = torch.tensor([[0.0, 0.1, 0.49], [0.5, 0.99, 1.0]])
    # bins = linspace(0, 1, 3) = (0, 0.5, 1): [0, .5) -> 0, [.5, 1) -> .5, max stays 1
    expected = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 1.0]])
    assert torch.equal(heat_quantize(heatmap, levels=3), expected)
    batch = heat_quantize(torch.stack([heatmap, heatmap * 2]), levels=3)
    assert torch.equal(batch[1], expected * 2)  # each map its own min/max
    with pytest.raises(ValueError):
        heat_quantize(torch.zeros(2, 2, 2, 2))
