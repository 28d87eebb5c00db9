"""The detectors of :mod:`relprop.detection.architectures`, built with no downloads: torchvision's
(SSD300, SSDlite, RetinaNet, FCOS), relprop's light SSD, RetinaNet and FCOS on a ResNet-18, and
Ultralytics' YOLOv8 (the optional ``yolo`` extra) wrapped by :mod:`relprop.detection.yolo`.

torchvision ships RetinaNet and FCOS on ResNet-50 only; a ResNet-18 FPN (128 channels, P3-P7 as in
the papers) trains in minutes on a CPU and is the same architecture family. Pretrained torchvision
detectors keep their backbone's BatchNorm as ``FrozenBatchNorm2d`` (no ``num_batches_tracked`` in
their files): ``frozen=True`` builds that, and relprop folds it like any BatchNorm.
``from_metadata`` / ``from_metadata_frozen`` are ``--model-def`` builders.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torchvision
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.detection.ssd import SSD, SSDHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from relprop.defaults import IMAGENET_MEAN, IMAGENET_STD
from relprop.detection.architectures import ARCHITECTURES, DETECTOR_ARCHS
from relprop.detection.yolo import build_yolo
from relprop.errors import ConfigError

FPN_CHANNELS = 128
LIGHT_DETECTORS = tuple(name for name, a in ARCHITECTURES.items() if not a.torchvision)
DETECTORS = DETECTOR_ARCHS


def resnet18_fpn(resnet: nn.Module | None = None, channels: int = FPN_CHANNELS) -> BackboneWithFPN:
    """ResNet-18's C3-C5 under an FPN with P6/P7 from P5 (RetinaNet's and FCOS's pyramid)."""
    resnet = resnet or torchvision.models.resnet18(weights=None)
    return BackboneWithFPN(resnet, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], channels,
                           extra_blocks=LastLevelP6P7(channels, channels))


class ResNet18SSDBackbone(nn.Module):
    """ResNet-18's C3-C5 (strides 8-32) and two extra stride-2 levels: an SSD pyramid whose trunk
    can start from a tin10 classifier (the architecture of ../shared's SSD, at scene sizes)."""

    channels = (128, 256, 512, 256, 256)

    def __init__(self, resnet: nn.Module | None = None) -> None:
        super().__init__()
        resnet = resnet or torchvision.models.resnet18(weights=None)
        self.body = nn.Sequential(OrderedDict(
            (name, getattr(resnet, name)) for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2")))
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4
        self.extra1, self.extra2 = _extra_level(512, 256), _extra_level(256, 256)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        c3 = self.body(x)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        e1 = self.extra1(c5)
        return OrderedDict(zip("01234", (c3, c4, c5, e1, self.extra2(e1)), strict=True))


def _extra_level(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs // 2, 1), nn.ReLU(inplace=True),
                         nn.Conv2d(outputs // 2, outputs, 3, stride=2, padding=1), nn.ReLU(inplace=True))


def build_detector(arch: str, num_classes: int, size: int | None = None, resnet: nn.Module | None = None,
                   frozen: bool = False, **options: Any) -> nn.Module:
    """``arch`` (one of DETECTORS) for ``num_classes`` classes (0 = background) on ``size`` px inputs
    (None: the architecture's own; relprop's light detectors 320); ``frozen``: its BatchNorms
    as FrozenBatchNorm2d."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown detector {arch!r}; choose one of {', '.join(DETECTORS)}")
    if ARCHITECTURES[arch].torchvision:
        sizing = {"min_size": size, "max_size": size} if size and not arch.startswith("ssd") else {}
        model = torchvision.models.get_model(arch, weights=None, weights_backbone=None,
                                             num_classes=num_classes, **(sizing | options))
    else:
        model = _light_detector(arch, num_classes, size or 320, resnet, **options)
    return frozen_batchnorm(model) if frozen else model


def _light_detector(arch: str, num_classes: int, size: int, resnet: nn.Module | None, **options: Any) -> nn.Module:
    if ARCHITECTURES[arch].family == "yolo":
        return build_yolo(arch, num_classes, size)
    if arch == "ssd_resnet18":
        anchors = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2], [2]], min_ratio=0.1, max_ratio=0.9)
        head = SSDHead(list(ResNet18SSDBackbone.channels), anchors.num_anchors_per_location(), num_classes)
        settings = {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
                    "score_thresh": 0.01, "nms_thresh": 0.45, "detections_per_img": 100} | options
        return SSD(ResNet18SSDBackbone(resnet), anchors, (size, size), num_classes, head=head, **settings)
    sizing = {"min_size": size, "max_size": size} | options
    if arch == "retinanet_resnet18_fpn":
        anchors = AnchorGenerator(tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3)))
                                        for s in (32, 64, 128, 256, 512)), ((0.5, 1.0, 2.0),) * 5)
        head = RetinaNetHead(FPN_CHANNELS, anchors.num_anchors_per_location()[0], num_classes)
        return RetinaNet(resnet18_fpn(resnet), num_classes, anchor_generator=anchors, head=head, **sizing)
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)
    head = FCOSHead(FPN_CHANNELS, 1, num_classes)
    return FCOS(resnet18_fpn(resnet), num_classes, anchor_generator=anchors, head=head, **sizing)


def frozen_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d replaced, in place, by torchvision's FrozenBatchNorm2d with
    the same statistics and affine parameters (what torchvision builds for pretrained detectors;
    their checkpoints have no ``num_batches_tracked``)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            frozen_batchnorm(child)
    return module


def from_metadata(metadata: Mapping[str, Any], frozen: bool = False) -> nn.Module:
    """``--model-def`` builder: a checkpoint's ``arch``, ``num_classes`` and ``input_size``."""
    size = metadata.get("input_size")
    size = int(size[0] if isinstance(size, (list, tuple)) else size) if size else None
    return build_detector(str(metadata.get("arch")), int(metadata["num_classes"]), size, frozen=frozen)


def from_metadata_frozen(metadata: Mapping[str, Any]) -> nn.Module:
    """``from_metadata`` with FrozenBatchNorm2d, for files saved from such a model (torchvision's
    pretrained detectors and what is fine-tuned from them)."""
    return from_metadata(metadata, frozen=True)


__all__ = ["DETECTORS", "LIGHT_DETECTORS", "ResNet18SSDBackbone", "build_detector", "frozen_batchnorm", "from_metadata",
           "from_metadata_frozen", "resnet18_fpn"]
