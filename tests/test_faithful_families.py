"""lrp-faithful as a family default: each family (ResNet, ConvNeXt, MobileNet/EfficientNet, ViT)
gets its registered candidate, built here by hand from its definition, and conserves where its
rules conserve."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from torch import nn

from relprop import LRP, heat_quantize
from relprop.core.composites import get_composite
from relprop.errors import InputError
from relprop.methods import get_method
from relprop.methods.faithful import FAMILIES, Candidate, CandidateMethod, family_of, stage_rules

timm = pytest.importorskip("timm")


def tiny_vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32,
                             patch_size=8, depth=2, embed_dim=32, num_heads=2)


BUILDERS = {
    "convnext": lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=3),
    "mobilenet": lambda: timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=3),
    "vit": tiny_vit,
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[name]().eval()


@pytest.mark.parametrize("make, family", [
    (lambda: torchvision.models.resnet18(num_classes=3), "resnet"),
    (lambda: timm.create_model("resnet18", pretrained=False, num_classes=3), "resnet"),
    (BUILDERS["convnext"], "convnext"),
    (lambda: torchvision.models.convnext_tiny(num_classes=3), "convnext"),
    (BUILDERS["mobilenet"], "mobilenet"),
    (lambda: timm.create_model("efficientnet_b0", pretrained=False, num_classes=3), "mobilenet"),
    (lambda: torchvision.models.mobilenet_v3_small(num_classes=3), "mobilenet"),
    (tiny_vit, "vit"),
    (lambda: torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=3), "vit"),
])
def test_family_of_names_each_family(make, family):
    assert family_of(make()).name == family


def test_a_model_of_no_family_is_refused_in_one_line():
    with pytest.raises(InputError, match=r"no family for Sequential .*register_family") as error:
        get_method("lrp-faithful", nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten()))
    assert "\n" not in str(error.value)


def test_stage_rules_take_timm_stages_in_halves():
    rules = stage_rules(build("convnext"), "gamma", "epsilon", "epsilon")
    assert rules["stages.0.blocks.0.conv_dw"] == rules["stages.1.downsample.1"] == "gamma"
    assert rules["stages.2.blocks.0.mlp.fc1"] == rules["stages.3.blocks.1.conv_dw"] == "epsilon"
    assert rules["head.fc"] == "epsilon" and "stem.0" not in rules
    rules = stage_rules(build("mobilenet"), "gamma", "epsilon", "epsilon")  # blocks.0..5
    assert rules["blocks.2.0.conv_pw"] == "gamma" and rules["blocks.3.0.conv_pw"] == "epsilon"
    assert "conv_stem" not in rules


@pytest.mark.parametrize("name", ["convnext", "mobilenet"])
def test_lrp_faithful_on_convnext_and_mobilenet_is_epsilon_everywhere_with_the_signed_split(name):
    model = build(name)
    x = torch.randn(1, 3, 32, 32)
    epsilon = {nn.Conv2d: "epsilon", nn.Linear: "epsilon", nn.LayerNorm: "norm-epsilon"}
    R = LRP(model, rules=epsilon, input_rule="epsilon", split="signed", bn="fold", maxpool="wta",
            constants="leak").attribute(x)
    maps = get_method("lrp-faithful", model).attribute(x)
    assert maps.shape == (1, 3, 32, 32)
    torch.testing.assert_close(maps, R, rtol=0, atol=0)


def test_stage_rules_still_serve_gamma_epsilon_candidates_on_timm_cnns():
    model = build("convnext")
    x = torch.randn(1, 3, 32, 32)
    rules = {name: ("gamma" if name.startswith(("stages.0.", "stages.1.")) else "epsilon")
             for name, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear)) and name.startswith("stages.")}
    rules["head.fc"] = "epsilon"
    R = LRP(model, rules=rules, input_rule="wplus", split="ratio", bn="fold").attribute(x)
    candidate = Candidate(lower="gamma", upper="epsilon", head="epsilon", input_rule="wplus", bn="fold",
                          hq_levels=8)
    maps = CandidateMethod(model, "c", candidate).attribute(x)
    assert torch.equal(maps[:, 0], heat_quantize(R.sum(1), levels=8))


def test_lrp_faithful_on_a_vit_is_attnlrp_with_its_signed_split():
    model = build("vit")
    x = torch.randn(2, 3, 32, 32)
    composite = get_composite("attnlrp")
    assert composite.split == "signed" and composite.attention == "attnlrp"
    R = LRP(model, composite=composite).attribute(x)
    maps = get_method("lrp-faithful", model).attribute(x)
    torch.testing.assert_close(maps, R, rtol=0, atol=0)


def test_base_split_changes_the_split_of_a_base_composite_only():
    model = build("vit")
    x = torch.randn(1, 3, 32, 32)
    signed = CandidateMethod(model, "c", Candidate(base="cp-lrp", base_split="signed")).attribute(x)
    ratio = CandidateMethod(model, "c", Candidate(base="cp-lrp", base_split="ratio")).attribute(x)
    torch.testing.assert_close(signed, LRP(model, composite=get_composite("cp-lrp")).attribute(x))
    assert not torch.allclose(signed, ratio)


@pytest.mark.parametrize("name", ["convnext", "mobilenet"])
def test_family_candidates_conserve_without_biases(name):
    """ε (1e-6) on every layer and the signed split conserve when no bias absorbs relevance: every
    cut carries the model's probability (inputs ×10: ε's share, ε/z, shrinks with the activations;
    at ×1 MobileNet's small random-init pre-activations lose a few tenths of a percent to it)."""
    model = build(name)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()
    x = 10 * torch.randn(2, 3, 32, 32)
    candidate = dataclasses.replace(FAMILIES[name].candidate, hq_levels=None)
    _, sums = CandidateMethod(model, "c", candidate).attribute(x, return_layer_sums=True)
    with torch.no_grad():
        probability = torch.softmax(model(x), 1).max(1).values
    for cut, total in sums.items():
        torch.testing.assert_close(total, probability, rtol=1e-3, atol=1e-6, msg=lambda m, c=cut: f"{c}: {m}")
