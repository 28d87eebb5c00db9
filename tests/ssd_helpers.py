"""Small SSDs for the detection tests: random weights, 64 px, a residual block, two head levels.

Built with torchvision's own SSD, SSDHead / SSDLiteHead and DefaultBoxGenerator, so every piece of
plumbing the explainer reads is torchvision's; only the backbone is ours (tiny, fast, traceable).
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead
from torchvision.models.detection.ssdlite import SSDLiteHead

from sharedfiles import SHARED

SHARED_DETECTOR = SHARED / "models" / "ssd_resnet18_tin10.pt"
SHARED_BUILDER = SHARED / "models" / "ssd_resnet18_tin10.py"
TIN10_VAL = SHARED / "data" / "tin10" / "val"


class TinyBackbone(nn.Module):
    """Conv/BN/ReLU stem, max pool (ceil mode), one identity residual block, two output levels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=0, ceil_mode=True),
        )
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.down1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True))
        self.down2 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        f = self.stem(x)
        branch = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(f)))))
        f = self.relu(branch + f)
        f1 = self.down1(f)
        f2 = self.down2(f1)
        return OrderedDict([("0", f1), ("1", f2)])


def _randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


def tiny_ssd(num_classes: int = 4, seed: int = 0, lite: bool = False, **kwargs) -> SSD:
    """A random-weight torchvision SSD on 64 px inputs (levels 4x4 and 2x2), eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    backbone = TinyBackbone()
    anchors = DefaultBoxGenerator([[2], [2, 3]], min_ratio=0.2, max_ratio=0.9)
    per_cell = anchors.num_anchors_per_location()
    if lite:
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
        head = SSDLiteHead([16, 16], per_cell, num_classes, norm)
    else:
        head = SSDHead([16, 16], per_cell, num_classes)
    for p in head.parameters():  # xavier/normal init leaves near-uniform scores: spread them
        p.data.add_(torch.randn(p.shape, generator=generator) * 0.2)
    options = {"score_thresh": 0.01, "nms_thresh": 0.45, "detections_per_img": 30,
               "topk_candidates": 20} | kwargs
    model = SSD(backbone, anchors, (64, 64), num_classes, head=head, **options)
    _randomize_batchnorm(model, generator)
    return model.eval()


def random_images(count: int = 2, seed: int = 0, sizes=((64, 64), (48, 80))) -> list[torch.Tensor]:
    """Images in [0, 1] of different sizes (the detector resizes them)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, *sizes[i % len(sizes)], generator=generator) for i in range(count)]


def shared_detector() -> SSD:
    """The trained tin10 detector from ../shared (skips the test when it is absent)."""
    if not SHARED_DETECTOR.exists() or not SHARED_BUILDER.exists():
        pytest.skip(f"shared detector not found at {SHARED_DETECTOR}")
    import importlib.util

    spec = importlib.util.spec_from_file_location("ssd_resnet18_tin10", SHARED_BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    checkpoint = torch.load(SHARED_DETECTOR, weights_only=True)
    model = module.from_metadata(checkpoint)
    model.load_state_dict({k: v.float() for k, v in checkpoint["state_dict"].items()})
    return model.eval()


def tin10_images(count: int) -> list[Path]:
    """The first image of each of the first ``count`` tin10 val classes (skips when absent)."""
    if not TIN10_VAL.is_dir():
        pytest.skip(f"tin10 val images not found at {TIN10_VAL}")
    classes = sorted(p for p in TIN10_VAL.iterdir() if p.is_dir())[:count]
    return [sorted(c.glob("*.JPEG"))[0] for c in classes]


def detection_dataset(folder: Path, model: SSD, count: int = 2) -> list[str]:
    """A tin10-style folder whose boxes are the detector's own top detections (true positives);
    returns the class list (background first) the folder names come from."""
    from torchvision.transforms.functional import to_pil_image

    from relprop.detection.families import run_detector

    images = random_images(count, sizes=((64, 64),))
    out = run_detector(model, images)
    classes = ["__background__", "c1", "c2", "c3"]
    lines: dict[str, list[str]] = {}
    for i, (image, det) in enumerate(zip(images, out.detections, strict=True)):
        label = classes[int(det["labels"][0])]
        (folder / label).mkdir(exist_ok=True)
        to_pil_image(image).save(folder / label / f"im{i}.png")
        x0, y0, x1, y1 = det["boxes"][0].round().int().tolist()
        lines.setdefault(label, []).append(f"im{i}.png\t{x0}\t{y0}\t{x1 - 1}\t{y1 - 1}")
    for label, rows in lines.items():
        (folder / label / "boxes.txt").write_text("\n".join(rows) + "\n")
    return classes
