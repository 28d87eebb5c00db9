"""The detectors relprop builds by name (`relprop detect --arch NAME`): one registry that the CLI's
--help, docs/crp.md and :mod:`relprop.detection.builders` read. No torch import, so that
`relprop --help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """A detector by name: its CRP family, a line for --help, and whether torchvision builds it
    (then torchvision's weights enum names its pretrained weights: ``--weights DEFAULT``)."""

    name: str
    family: str
    summary: str
    torchvision: bool = True
    trainer: str = "benchmarks/train_detectors.py"  # the script that trains it on the tin10 scenes


ARCHITECTURES = {a.name: a for a in (
    Architecture("ssd300_vgg16", "ssd", "SSD300, VGG-16 (the CRP paper's detector)"),
    Architecture("ssdlite320_mobilenet_v3_large", "ssd", "SSDlite320, MobileNetV3-Large"),
    Architecture("retinanet_resnet50_fpn", "retinanet", "RetinaNet, ResNet-50 FPN"),
    Architecture("retinanet_resnet50_fpn_v2", "retinanet", "RetinaNet v2, ResNet-50 FPN, GroupNorm head"),
    Architecture("fcos_resnet50_fpn", "fcos", "FCOS, ResNet-50 FPN (anchor-free, centerness)"),
    Architecture("ssd_resnet18", "ssd",
                 "SSD, ResNet-18 C3-C5 and two extra levels (relprop's; trains on a CPU)", torchvision=False),
    Architecture("retinanet_resnet18_fpn", "retinanet",
                 "RetinaNet, ResNet-18 FPN, 128 channels (relprop's; trains on a CPU)", torchvision=False),
    Architecture("fcos_resnet18_fpn", "fcos",
                 "FCOS, ResNet-18 FPN, 128 channels (relprop's; trains on a CPU)", torchvision=False),
    Architecture("yolov8n", "yolo", "YOLOv8-n, Ultralytics (the yolo extra, AGPL-3.0; DFL box head)", torchvision=False,
                 trainer="benchmarks/train_yolo.py"),
    Architecture("yolov8s", "yolo", "YOLOv8-s, Ultralytics (the yolo extra, AGPL-3.0; DFL box head)", torchvision=False,
                 trainer="benchmarks/train_yolo.py"),
)}
DETECTOR_ARCHS = tuple(ARCHITECTURES)


def architecture_lines(indent: str = "  ") -> str:
    """One line per architecture, for --help and the docs."""
    width = max(map(len, ARCHITECTURES))
    return "\n".join(f"{indent}{a.name:<{width}}  {a.summary}" + ("" if a.torchvision else "; no pretrained weights")
                     for a in ARCHITECTURES.values())


__all__ = ["ARCHITECTURES", "DETECTOR_ARCHS", "Architecture", "architecture_lines"]
