"""lrp-faithful and the search's candidates: stage rules, HQ bins, and the method = LRP + HQ."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from relprop import LRP, heat_quantize
from relprop.errors import InputError
from relprop.methods import get_method
from relprop.methods.faithful import FAITHFUL, Candidate, CandidateMethod, quantize, stage_rules


def test_stage_rules_split_resnet_stages_in_halves():
    rules = stage_rules(torchvision.models.resnet18(num_classes=3), "gamma", "epsilon", "epsilon")
    assert rules["layer1.0.conv1"] == rules["layer2.1.conv2"] == rules["layer2.0.downsample.0"] == "gamma"
    assert rules["layer3.0.conv1"] == rules["layer4.1.conv2"] == rules["layer4.0.downsample.0"] == "epsilon"
    assert rules["fc"] == "epsilon" and "conv1" not in rules  # the input layer has the input rule


def test_stage_rules_refuse_models_without_stages():
    with pytest.raises(InputError, match="layer1..layerN"):
        stage_rules(nn.Sequential(nn.Conv2d(3, 2, 3)), "gamma", "epsilon", None)


def test_total_bins_hand_computed():
    # a map of total 4: shares (0.5, 0.25, 0.25, 0); bins linspace(0, 0.5, 3) = (0, 0.25, 0.5)
    heat = torch.tensor([[[2.0, 1.0], [1.0, 0.0]]])
    assert torch.equal(quantize(heat, 3, "total", (0.0, 0.5)), torch.tensor([[[0.5, 0.25], [0.25, 0.0]]]))
    with pytest.raises(InputError, match="positive total"):
        quantize(-heat, 3, "total", (0.0, 0.5))


def test_image_bins_are_the_papers_heat_quantization():
    heat = torch.rand(2, 5, 5)
    assert torch.equal(quantize(heat, 8), heat_quantize(heat, levels=8))


def test_lrp_faithful_on_a_resnet_is_its_composite_and_plus_hq_the_former_default():
    """No HQ in the ResNet's lrp-faithful (its paper-protocol lead came from HQ's ties); the
    former default is `lrp-faithful+hq`: the composite's channel sum in 8 levels."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    mean, std = [0.5] * 3, [0.25] * 3
    maps = get_method("lrp-faithful", model, mean=mean, std=std).attribute(x)
    rules = stage_rules(model, FAITHFUL.lower, FAITHFUL.upper, FAITHFUL.head)
    R = LRP(model, rules=rules, input_rule="wplus", split="ratio", bn="fold").attribute(x)
    assert FAITHFUL.hq_levels is None
    assert maps.shape == (1, 3, 32, 32) and torch.equal(maps, R)
    quantized = get_method("lrp-faithful+hq", model, mean=mean, std=std).attribute(x)
    assert torch.equal(quantized[:, 0], heat_quantize(R.sum(1), levels=8))


def test_positive_candidate_clips_before_quantizing():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    signed = CandidateMethod(model, "c", Candidate(base="alpha2beta1")).attribute(x).sum(1)
    clipped = CandidateMethod(model, "c", Candidate(base="alpha2beta1", positive=True)).attribute(x)[:, 0]
    assert bool((signed < 0).any())
    assert torch.equal(clipped, signed.clamp(min=0))
