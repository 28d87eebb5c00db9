"""Small RetinaNet and FCOS for the detection tests: random weights, 64 px, a feature pyramid.

Built with torchvision's own RetinaNet / FCOS, heads, AnchorGenerator and FeaturePyramidNetwork
(upsample + add top-down, P6/P7 extra levels), so every piece of plumbing the explainer reads is
torchvision's; only the bottom-up backbone is ours (tiny, fast, traceable, one residual block).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.ops.feature_pyramid_network import (
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

WIDTH = 32  # FCOS's head has GroupNorm(32, C): C must be a multiple of 32


class TinyFPNBackbone(nn.Module):
    """Stem, one identity residual block, two downsamplings; an FPN over C2-C4 plus P6, P7
    (convolutions) or P6 alone (``max_pool``: torchvision's LastLevelMaxPool)."""

    def __init__(self, width: int = WIDTH, max_pool: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.c3 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True))
        self.c4 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True))
        extra = LastLevelMaxPool() if max_pool else LastLevelP6P7(width, width)
        self.fpn = FeaturePyramidNetwork([8, 16, 16], width, extra_blocks=extra)
        self.out_channels = width

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        f = self.stem(x)
        c2 = self.relu(self.conv2(self.relu(self.conv1(f))) + f)
        c3 = self.c3(c2)
        c4 = self.c4(c3)
        return self.fpn(OrderedDict([("0", c2), ("1", c3), ("2", c4)]))


def _spread(module: nn.Module, generator: torch.Generator, scale: float = 0.2) -> None:
    for p in module.parameters():  # the heads' near-zero init leaves flat scores: spread them
        p.data.add_(torch.randn(p.shape, generator=generator) * scale)


def tiny_retinanet(num_classes: int = 5, seed: int = 0, **kwargs) -> RetinaNet:
    """A random-weight RetinaNet on 64 px inputs (levels 16, 8, 4, 2, 1), 2 anchors per cell."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    backbone = TinyFPNBackbone()
    anchors = AnchorGenerator(((8,), (16,), (32,), (48,), (64,)), ((0.5, 1.0),) * 5)
    head = RetinaNetHead(WIDTH, 2, num_classes)
    _spread(head, generator, 0.05)
    head.classification_head.cls_logits.bias.data.zero_()  # not the 1 % prior: scores near 0.5
    options = {"score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 30,
               "topk_candidates": 50, "min_size": 64, "max_size": 64} | kwargs
    model = RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, **options)
    _spread(model.backbone, generator, 0.05)
    return model.eval()


def tiny_fcos(num_classes: int = 5, seed: int = 0, **kwargs) -> FCOS:
    """A random-weight FCOS on 64 px inputs (levels 16, 8, 4, 2: P6 by max pooling), one location
    per cell (GroupNorm(32) in the head cannot normalize a 1x1 level of 32 channels)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    backbone = TinyFPNBackbone(max_pool=True)
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,)), ((1.0,),) * 4)
    head = FCOSHead(WIDTH, 1, num_classes, num_convs=2)
    _spread(head, generator)
    head.classification_head.cls_logits.bias.data.zero_()
    options = {"score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 30,
               "topk_candidates": 50, "min_size": 64, "max_size": 64} | kwargs
    model = FCOS(backbone, num_classes, anchor_generator=anchors, head=head, **options)
    _spread(model.backbone, generator, 0.05)
    return model.eval()
