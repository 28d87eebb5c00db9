"""SSD plumbing for explaining detections: run torchvision's SSD piece by piece, keep anchor indices.

torchvision's ``SSD.forward`` returns boxes, scores and labels but drops which anchor (default box)
each detection came from, and its ``SSDHead`` loops over a list of feature maps, so it cannot be
traced. Explaining a detection needs both: the anchor n* (to seed its class logits and box offsets)
and the head convolution of n*'s level (to apply a rule to it). This module runs the detector's own
transform, backbone, per-level head modules and anchor generator, and re-runs the post-processing
selection with the anchor index carried along, so its detections equal ``model(images)`` exactly.

Anchor indices follow torchvision's flattening of the head outputs: levels in order, and inside a
level ``((y * W) + x) * A + a`` for grid cell (y, x) and default box a of the A boxes per cell; the
head conv's output channel of class k (or offset j) of box a is ``a * K + k`` (``a * 4 + j``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD, SSDFeatureExtractorVGG
from torchvision.ops import boxes as box_ops

from relprop.errors import InputError, TargetError, UnsupportedLayerError

BOX_OUTPUTS = ("cx", "cy", "w", "h")
"""The four box offsets in torchvision's BoxCoder order (weights 10, 10, 5, 5)."""


@dataclass(frozen=True)
class Level:
    """One head level: its grid, its default boxes per cell, and its first global anchor index."""

    index: int
    height: int
    width: int
    anchors_per_cell: int
    start: int

    @property
    def count(self) -> int:
        return self.height * self.width * self.anchors_per_cell


@dataclass(frozen=True)
class AnchorPosition:
    """Where anchor n lives: level, grid cell (y, x) and default box a inside the cell."""

    level: int
    y: int
    x: int
    box: int


@dataclass(frozen=True)
class HeadLevel:
    """One level's head branch split into an optional prefix (SSDLite) and its last convolution."""

    prefix: nn.Module | None
    conv: nn.Conv2d


@dataclass
class DetectorOutput:
    """Everything one detector forward produced, with the anchor of every detection.

    ``x`` is the batch in the detector's own input space (after its transform's normalization and
    resize); explanations live in that space. ``detections[i]`` has torchvision's keys ``boxes``
    (original image coordinates), ``scores``, ``labels`` plus ``anchors`` (global anchor index),
    ``levels`` and ``boxes_input`` (boxes in input-space coordinates). ``bbox_regression`` holds
    the family's four box outputs (SSD/RetinaNet offsets, FCOS distances).
    """

    x: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    features: list[Tensor]
    cls_logits: Tensor
    bbox_regression: Tensor
    anchors: list[Tensor]
    levels: list[Level]
    detections: list[dict[str, Tensor]]
    extras: dict[str, Tensor] = field(default_factory=dict)  # FCOS: centerness logits (N, A, 1)


def check_ssd(model: nn.Module) -> SSD:
    """Fail with one line unless ``model`` is a torchvision SSD whose head we know how to read."""
    if not isinstance(model, SSD):
        raise UnsupportedLayerError(
            f"CRP needs a torchvision SSD (torchvision.models.detection.SSD), got {type(model).__name__}"
        )
    head = model.head
    for name in ("classification_head", "regression_head"):
        branch = getattr(head, name, None)
        if branch is None or not hasattr(branch, "module_list"):
            raise UnsupportedLayerError(
                f"SSD head {type(head).__name__} has no {name}.module_list; CRP reads torchvision's "
                "SSDHead/SSDLiteHead layout"
            )
    return model


def head_levels(model: SSD, kind: str) -> list[HeadLevel]:
    """The per-level head branches of ``kind`` "class" or "box", each split into prefix + last conv."""
    branch = model.head.classification_head if kind == "class" else model.head.regression_head
    return [_split_head_module(module, kind, i) for i, module in enumerate(branch.module_list)]


def _split_head_module(module: nn.Module, kind: str, level: int) -> HeadLevel:
    if isinstance(module, nn.Conv2d):
        return HeadLevel(None, module)
    if isinstance(module, nn.Sequential) and len(module) > 0 and isinstance(module[-1], nn.Conv2d):
        prefix = nn.Sequential(*list(module.children())[:-1])
        return HeadLevel(prefix, module[-1])
    raise UnsupportedLayerError(
        f"{kind} head of level {level} is {type(module).__name__}; CRP needs a Conv2d or a "
        "Sequential ending in a Conv2d"
    )


def traceable_backbone(model: SSD) -> nn.Module:
    """The backbone as a module torch.fx can trace with one rule per leaf module.

    SSD300-VGG16 computes its L2Norm inline (``scale * F.normalize(x)``); it is re-expressed as an
    :class:`L2Norm` leaf module sharing the same parameter, so a pass-through rule can be registered
    for it. Other backbones are returned unchanged.
    """
    backbone = model.backbone
    if isinstance(backbone, SSDFeatureExtractorVGG):
        return VGGFeatures(backbone)
    return backbone


class L2Norm(nn.Module):
    """SSD's L2 normalization with learned per-channel scale; relevance passes it unchanged."""

    def __init__(self, scale: nn.Parameter) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale.view(1, -1, 1, 1) * F.normalize(x)


class VGGFeatures(nn.Module):
    """torchvision's SSDFeatureExtractorVGG with its L2Norm as a module (same weights, same output)."""

    def __init__(self, backbone: SSDFeatureExtractorVGG) -> None:
        super().__init__()
        self.features = backbone.features
        self.l2norm = L2Norm(backbone.scale_weight)
        self.extra = backbone.extra

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.features(x)
        output = [self.l2norm(x)]
        for block in self.extra:
            x = block(x)
            output.append(x)
        return OrderedDict([(str(i), v) for i, v in enumerate(output)])


def as_image_list(images: Tensor | Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """Images as torchvision's detection API takes them: a list of float (3, H, W) tensors in [0, 1]."""
    if isinstance(images, Tensor):
        if images.dim() == 3:
            images = [images]
        elif images.dim() == 4:
            images = list(images)
        else:
            raise InputError(
                f"images must be (3,H,W) or (N,3,H,W), got shape {tuple(images.shape)}"
            )
    out = []
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise InputError(f"image {i} must be a (3,H,W) tensor in [0, 1], got {shape}")
        if not image.is_floating_point():
            raise InputError(f"image {i} must be float in [0, 1], got {image.dtype}")
        out.append(image.to(device))
    if not out:
        raise InputError("no images given")
    return out


def level_layout(features: Sequence[Tensor], anchors_per_cell: Sequence[int]) -> list[Level]:
    """The head levels' grids and global anchor offsets, in torchvision's concatenation order."""
    levels, start = [], 0
    for i, (feature, count) in enumerate(zip(features, anchors_per_cell, strict=True)):
        level = Level(i, int(feature.shape[-2]), int(feature.shape[-1]), int(count), start)
        levels.append(level)
        start += level.count
    return levels


def locate_anchor(levels: Sequence[Level], n: int) -> AnchorPosition:
    """Level, grid cell and default box of global anchor index ``n``."""
    for level in levels:
        if level.start <= n < level.start + level.count:
            local = n - level.start
            cell, box = divmod(local, level.anchors_per_cell)
            y, x = divmod(cell, level.width)
            return AnchorPosition(level.index, y, x, box)
    total = levels[-1].start + levels[-1].count if levels else 0
    raise TargetError(f"anchor index {n} out of range [0, {total})")


def anchor_index(levels: Sequence[Level], position: AnchorPosition) -> int:
    """Global anchor index of a (level, y, x, box) position (inverse of :func:`locate_anchor`)."""
    level = levels[position.level]
    return (
        level.start
        + (position.y * level.width + position.x) * level.anchors_per_cell
        + position.box
    )


def flatten_level(maps: Tensor, columns: int) -> Tensor:
    """(N, A*columns, H, W) head output -> (N, H*W*A, columns), exactly as torchvision's SSD head."""
    n, _, h, w = maps.shape
    return maps.view(n, -1, columns, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, columns)


def head_maps(levels: Sequence[HeadLevel], features: Sequence[Tensor]) -> list[Tensor]:
    """Raw per-level head outputs (N, A*columns, H, W) for the given feature maps."""
    maps = []
    for head, feature in zip(levels, features, strict=True):
        a = head.prefix(feature) if head.prefix is not None else feature
        maps.append(head.conv(a))
    return maps


def select_detections(
    model: SSD,
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
) -> list[dict[str, Tensor]]:
    """torchvision's ``SSD.postprocess_detections`` carrying each candidate's anchor index.

    Same thresholds, top-k, batched NMS and cap, in the same order, so boxes, scores and labels are
    identical to torchvision's; ``anchors`` holds the anchor index of each kept detection.
    """
    scores_all = F.softmax(cls_logits, dim=-1)
    num_classes = scores_all.size(-1)
    detections = []
    for codes, scores, image_anchors, size in zip(
        bbox_regression, scores_all, anchors, image_sizes, strict=True
    ):
        boxes = model.box_coder.decode_single(codes, image_anchors)
        boxes = box_ops.clip_boxes_to_image(boxes, size)
        everyone = torch.arange(scores.size(0), device=scores.device)
        kept_scores, kept_anchors, kept_labels = [], [], []
        for label in range(1, num_classes):
            score = scores[:, label]
            keep = score > model.score_thresh
            score, idx = score[keep], everyone[keep]
            score, order = score.topk(min(model.topk_candidates, score.size(0)))
            kept_scores.append(score)
            kept_anchors.append(idx[order])
            kept_labels.append(torch.full_like(order, label))
        cand_scores = torch.cat(kept_scores)
        cand_anchors = torch.cat(kept_anchors)
        cand_labels = torch.cat(kept_labels)
        cand_boxes = boxes[cand_anchors]
        keep = box_ops.batched_nms(cand_boxes, cand_scores, cand_labels, model.nms_thresh)
        keep = keep[: model.detections_per_img]
        detections.append(
            {
                "boxes": cand_boxes[keep],
                "scores": cand_scores[keep],
                "labels": cand_labels[keep],
                "anchors": cand_anchors[keep],
            }
        )
    return detections


@torch.no_grad()
def detect_input(
    model: SSD,
    x: Tensor,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    original_sizes: Sequence[tuple[int, int]] | None = None,
    backbone: nn.Module | None = None,
) -> DetectorOutput:
    """Detections for a batch already in the detector's input space (e.g. perturbed inputs).

    ``image_sizes`` default to the batch's size, ``original_sizes`` to ``image_sizes``.
    """
    image_sizes, original_sizes = batch_sizes(x, image_sizes, original_sizes)
    features, cls_logits, bbox_regression = dense_outputs(model, x, backbone)
    levels = level_layout(features, model.anchor_generator.num_anchors_per_location())
    anchors = model.anchor_generator(ImageList(x, image_sizes), features)
    detections = select_detections(model, cls_logits, bbox_regression, anchors, image_sizes)
    return assemble_output(model, x, image_sizes, original_sizes, features, cls_logits, bbox_regression,
                           anchors, levels, detections)


def batch_sizes(
    x: Tensor, image_sizes: Sequence[tuple[int, int]] | None, original_sizes: Sequence[tuple[int, int]] | None
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``image_sizes`` default to the batch's size, ``original_sizes`` to ``image_sizes``."""
    size = (int(x.shape[-2]), int(x.shape[-1]))
    image_sizes = list(image_sizes or [size] * x.shape[0])
    return image_sizes, list(original_sizes or image_sizes)


def assemble_output(
    model: nn.Module, x: Tensor, image_sizes: list[tuple[int, int]], original_sizes: list[tuple[int, int]],
    features: list[Tensor], cls_logits: Tensor, box_outputs: Tensor, anchors: list[Tensor], levels: list,
    detections: list[dict[str, Tensor]], extras: dict[str, Tensor] | None = None,
) -> DetectorOutput:
    """Each detection's level and input-space box kept, its box mapped back as the model's own
    post-processing does: what every family's ``detect_input`` returns."""
    for det in detections:
        det["boxes_input"] = det["boxes"].clone()
        det["levels"] = torch.as_tensor(
            [locate_anchor(levels, int(n)).level for n in det["anchors"]], dtype=torch.int64
        )
    detections = model.transform.postprocess(detections, image_sizes, original_sizes)
    return DetectorOutput(
        x=x, image_sizes=image_sizes, original_sizes=original_sizes, features=features,
        cls_logits=cls_logits, bbox_regression=box_outputs, anchors=anchors, levels=levels,
        detections=detections, extras=extras or {},
    )


def dense_outputs(
    model: SSD, x: Tensor, backbone: nn.Module | None = None
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Feature maps, class logits (N, A, K) and box offsets (N, A, 4) of every anchor."""
    out = (backbone or model.backbone)(x)
    features = list(out.values()) if isinstance(out, dict) else [out]
    num_classes = num_classes_of(model)
    cls_maps = head_maps(head_levels(model, "class"), features)
    box_maps = head_maps(head_levels(model, "box"), features)
    cls_logits = torch.cat([flatten_level(m, num_classes) for m in cls_maps], 1)
    bbox_regression = torch.cat([flatten_level(m, 4) for m in box_maps], 1)
    return features, cls_logits, bbox_regression


def decode_anchor(model: SSD, codes: Tensor, anchor: Tensor) -> Tensor:
    """Box (x0, y0, x1, y1) decoded from one anchor's 4 offsets, before clipping."""
    return model.box_coder.decode_single(codes.view(1, 4), anchor.view(1, 4)).view(4)


def box_center(box: Tensor) -> tuple[float, float]:
    """Centre (cx, cy) of an (x0, y0, x1, y1) box."""
    return float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2


def scale_box(box: Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """Box in an image of ``from_size`` (H, W) -> the same box in an image of ``to_size``."""
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return box * torch.as_tensor([sx, sy, sx, sy], dtype=box.dtype, device=box.device)


def num_classes_of(model: SSD) -> int:
    """Number of classes of the detector's head, background included."""
    first = head_levels(model, "class")[0].conv
    return first.out_channels // model.anchor_generator.num_anchors_per_location()[0]


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of (x0, y0, x1, y1) boxes, (M,4) x (N,4) -> (M,N)."""
    return box_ops.box_iou(a, b)
