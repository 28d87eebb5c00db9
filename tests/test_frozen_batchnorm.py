"""torchvision's FrozenBatchNorm2d (the backbones of its pretrained detectors) is folded exactly as an
eval-mode BatchNorm2d: same maps, bit for bit, and conservation holds."""

from __future__ import annotations

import copy

import pytest
import torch
from ssd_helpers import random_images
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from relprop.detection.builders import build_detector, frozen_batchnorm
from relprop.detection.crp import CRP

torch.set_num_threads(1)


def _non_trivial_statistics(model: nn.Module, seed: int = 0) -> None:
    """Random running statistics and affine parameters, negative scales included (folding flips
    the sign of a conv's weights there, which z+ sees)."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=generator) * 3 - 1.5)
            m.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


@pytest.mark.parametrize("arch", ["ssd_resnet18", "retinanet_resnet18_fpn", "fcos_resnet18_fpn"])
def test_frozen_batchnorm_gives_the_batchnorm_maps_and_conserves(arch):
    torch.manual_seed(0)
    model = build_detector(arch, 4, size=96, score_thresh=1e-3).eval()
    _non_trivial_statistics(model)
    frozen = frozen_batchnorm(copy.deepcopy(model))
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules()) == 20  # ResNet-18's
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    images = random_images(1, sizes=((96, 96),))
    with torch.no_grad():
        assert torch.allclose(model.backbone(images[0][None])["0"], frozen.backbone(images[0][None])["0"],
                              atol=1e-5)
    maps = {}
    for name, detector in (("bn", model), ("frozen", frozen)):
        crp = CRP(detector)
        out = crp.detect(images)
        assert len(out.detections[0]["scores"]) > 1
        maps[name] = [crp.attribute(images, detection=1, output=o, contrast=c)
                      for o, c in (("class", True), ("class", False), (crp.family.box_outputs[0], None))]
    for ours, theirs in zip(maps["frozen"], maps["bn"], strict=True):
        assert ours.abs().sum() > 0
        assert torch.equal(ours, theirs)
    contrastive, plain, box = maps["frozen"]
    assert abs(float(plain.sum()) - 1) < 1e-4  # plain LRP of the logit conserves to the input
    assert abs(float(contrastive.sum())) <= 1e-4 * float(contrastive.abs().sum())
    assert abs(float(box.sum())) <= 1e-4 * float(box.abs().sum())
