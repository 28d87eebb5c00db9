"""Detector families CRP explains: torchvision's SSD, RetinaNet and FCOS, and Ultralytics' YOLO
(through :class:`relprop.detection.yolo.YOLODetector`), read piece by piece.

Each family answers the same questions for :class:`relprop.detection.crp.CRP`: which backbone
module to trace (the FPN included: its upsample + add is explained by the engine, with Relevance
Splitting at the add), which head convolution produces a given output of a given level (with the
tower before it as a prefix), what the box outputs mean, and how the model's own post-processing
picks its detections, re-run here with each detection's anchor index carried along so that the
detections equal ``model(images)`` exactly.

All heads flatten a level's (N, A*C, H, W) output the same way (``((y*W)+x)*A + a``, channel
``a*C + c``; YOLO has A = 1), so :func:`relprop.detection.ssd.locate_anchor` serves them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD
from torchvision.ops import boxes as box_ops

from relprop.detection import ssd, yolo
from relprop.detection.ssd import (
    BOX_OUTPUTS,
    DetectorOutput,
    HeadLevel,
    as_image_list,
    level_layout,
)
from relprop.detection.yolo import YOLO_BOX_OUTPUTS, YOLODetector
from relprop.errors import InputError, UnsupportedLayerError

FCOS_BOX_OUTPUTS = ("l", "t", "r", "b")
"""FCOS's four distances from the location to the box's left, top, right and bottom edges."""


@dataclass(frozen=True)
class Family:
    """How one detector family is read; ``box_outputs`` name its four regression outputs in order,
    ``extra_outputs`` any further per-anchor outputs (FCOS: centerness ``ctr``)."""

    name: str
    box_outputs: tuple[str, ...]
    extra_outputs: tuple[str, ...] = ()

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("class", *self.box_outputs, *self.extra_outputs)


SSD_FAMILY = Family("ssd", BOX_OUTPUTS)
RETINANET_FAMILY = Family("retinanet", BOX_OUTPUTS)
FCOS_FAMILY = Family("fcos", FCOS_BOX_OUTPUTS, ("ctr",))
YOLO_FAMILY = Family("yolo", YOLO_BOX_OUTPUTS)
SUPPORTED = "torchvision SSD, RetinaNet or FCOS (torchvision.models.detection), or relprop's YOLODetector"


def family_of(model: nn.Module) -> Family:
    """The family of ``model``, or one line saying which detectors CRP reads."""
    if isinstance(model, SSD):
        ssd.check_ssd(model)
        return SSD_FAMILY
    if isinstance(model, FCOS):
        _check_heads(model, ("cls_logits",), ("bbox_reg", "bbox_ctrness"))
        return FCOS_FAMILY
    if isinstance(model, RetinaNet):
        _check_heads(model, ("cls_logits",), ("bbox_reg",))
        return RETINANET_FAMILY
    if isinstance(model, YOLODetector):
        return YOLO_FAMILY
    raise UnsupportedLayerError(f"CRP needs a {SUPPORTED}, got {type(model).__name__}")


def _check_heads(model: nn.Module, cls_names: Sequence[str], box_names: Sequence[str]) -> None:
    for branch, names in (("classification_head", cls_names), ("regression_head", box_names)):
        head = getattr(model.head, branch, None)
        for name in ("conv", *names):
            if not isinstance(getattr(head, name, None), nn.Module):
                raise UnsupportedLayerError(
                    f"{type(model).__name__} head has no {branch}.{name}; CRP reads torchvision's "
                    "RetinaNet/FCOS head layout (a conv tower, then one Conv2d per output)"
                )


def traceable_backbone(model: nn.Module) -> nn.Module:
    """The module the engine traces (SSD300-VGG16's inline L2Norm re-expressed; FPNs as they are)."""
    return ssd.traceable_backbone(model) if isinstance(model, SSD) else model.backbone


def head_level(model: nn.Module, output: str, level: int) -> HeadLevel:
    """The head branch producing ``output`` ("class", "box" or "ctr") at ``level``: prefix + conv.

    RetinaNet and FCOS share one head over all levels; the prefix is the branch's conv tower.
    YOLO has one branch per level (``cv3`` classes, ``cv2`` box bins): its convs, then a Conv2d.
    """
    if isinstance(model, SSD):
        return ssd.head_levels(model, "class" if output == "class" else "box")[level]
    if isinstance(model, YOLODetector):
        branch = (model.head.cv3 if output == "class" else model.head.cv2)[level]
        return HeadLevel(branch[:-1], branch[-1])
    head = model.head.classification_head if output == "class" else model.head.regression_head
    conv = {"class": "cls_logits", "box": "bbox_reg", "ctr": "bbox_ctrness"}[output]
    return HeadLevel(head.conv, getattr(head, conv))


def num_classes_of(model: nn.Module) -> int:
    """Number of classes of the detector's head (SSD: background included)."""
    if isinstance(model, SSD):
        return ssd.num_classes_of(model)
    if isinstance(model, YOLODetector):
        return model.num_classes
    return int(model.head.classification_head.num_classes)


def anchors_per_cell(model: nn.Module, features: Sequence[Tensor]) -> list[int]:
    counts = model.anchor_generator.num_anchors_per_location()
    return [int(c) for c in counts] if len(counts) == len(features) else [int(counts[0])] * len(features)


def dense_outputs(
    model: nn.Module, x: Tensor, backbone: nn.Module | None = None
) -> tuple[list[Tensor], Tensor, Tensor, dict[str, Tensor]]:
    """Feature maps, class logits (N, A, K), box outputs (N, A, 4) and extras of every anchor,
    computed by the model's own head modules. FCOS's extras: ``ctr`` (N, A, 1), the centerness
    logits, and ``box_raw`` (N, A, 4), its distances before their ReLU (what a box map explains)."""
    if isinstance(model, SSD):
        return (*ssd.dense_outputs(model, x, backbone), {})
    if isinstance(model, YOLODetector):
        return yolo.dense_outputs(model, x, backbone)
    out = (backbone or model.backbone)(x)
    features = list(out.values()) if isinstance(out, dict) else [out]
    if not isinstance(model, FCOS):
        head = model.head(features)
        return features, head["cls_logits"], head["bbox_regression"], {}
    cls_head, box_head = model.head.classification_head, model.head.regression_head
    logits, raw, ctr = [], [], []
    for feature in features:  # FCOSHead's forward, keeping the distances before their ReLU
        logits.append(ssd.flatten_level(cls_head.cls_logits(cls_head.conv(feature)), cls_head.num_classes))
        tower = box_head.conv(feature)
        raw.append(ssd.flatten_level(box_head.bbox_reg(tower), 4))
        ctr.append(ssd.flatten_level(box_head.bbox_ctrness(tower), 1))
    raw_all = torch.cat(raw, 1)
    return features, torch.cat(logits, 1), torch.relu(raw_all), {"ctr": torch.cat(ctr, 1), "box_raw": raw_all}


def select_detections(
    model: nn.Module,
    cls_logits: Tensor,
    box_outputs: Tensor,
    extras: dict[str, Tensor],
    anchors: Sequence[Tensor],
    counts: Sequence[int],
    image_sizes: Sequence[tuple[int, int]],
) -> list[dict[str, Tensor]]:
    """RetinaNet's / FCOS's ``postprocess_detections`` carrying each candidate's anchor index.

    Same per-level score threshold, top-k, decoding, clipping, batched NMS and cap in the same
    order, so boxes, scores and labels are torchvision's; ``counts`` are the anchors per level.
    """
    fcos = isinstance(model, FCOS)
    detections = []
    for i, size in enumerate(image_sizes):
        boxes_all, scores_all, labels_all, anchors_all = [], [], [], []
        start = 0
        for count in counts:
            logits = cls_logits[i, start : start + count]
            scores = torch.sigmoid(logits)
            if fcos:
                scores = torch.sqrt(scores * torch.sigmoid(extras["ctr"][i, start : start + count]))
            scores = scores.flatten()
            keep = scores > model.score_thresh
            scores = scores[keep]
            idx = torch.where(keep)[0]
            scores, order = scores.topk(min(model.topk_candidates, idx.size(0)))
            idx = idx[order]
            local = torch.div(idx, logits.shape[-1], rounding_mode="floor")
            codes = box_outputs[i, start : start + count][local]
            level_anchors = anchors[i][start : start + count][local]
            if fcos:
                boxes = model.box_coder.decode(codes, level_anchors)
            else:
                boxes = model.box_coder.decode_single(codes, level_anchors)
            boxes_all.append(box_ops.clip_boxes_to_image(boxes, size))
            scores_all.append(scores)
            labels_all.append(idx % logits.shape[-1])
            anchors_all.append(local + start)
            start += count
        boxes, scores = torch.cat(boxes_all), torch.cat(scores_all)
        labels, kept_anchors = torch.cat(labels_all), torch.cat(anchors_all)
        keep = box_ops.batched_nms(boxes, scores, labels, model.nms_thresh)[: model.detections_per_img]
        detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep],
                           "anchors": kept_anchors[keep]})
    return detections


@torch.no_grad()
def run_detector(
    model: nn.Module, images: Tensor | Sequence[Tensor], backbone: nn.Module | None = None
) -> DetectorOutput:
    """Run ``model`` in pieces on images in [0, 1]; detections equal ``model(images)`` plus anchors.

    ``backbone`` may replace ``model.backbone`` by an equivalent module (see :func:`traceable_backbone`).
    """
    family_of(model)
    if model.training:
        raise InputError("the detector is in training mode; call model.eval() first")
    device = next(model.parameters()).device
    image_list = as_image_list(images, device)
    original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in image_list]
    batch, _ = model.transform(image_list)
    image_sizes = [(int(h), int(w)) for h, w in batch.image_sizes]
    return detect_input(model, batch.tensors, image_sizes, original_sizes, backbone)


@torch.no_grad()
def detect_input(
    model: nn.Module,
    x: Tensor,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    original_sizes: Sequence[tuple[int, int]] | None = None,
    backbone: nn.Module | None = None,
) -> DetectorOutput:
    """Detections for a batch already in the detector's input space (e.g. perturbed inputs)."""
    if isinstance(model, SSD):
        return ssd.detect_input(model, x, image_sizes, original_sizes, backbone)
    image_sizes, original_sizes = ssd.batch_sizes(x, image_sizes, original_sizes)
    if isinstance(model, YOLODetector):
        return yolo.detect_input(model, x, image_sizes, original_sizes, backbone)
    features, cls_logits, box_outputs, extras = dense_outputs(model, x, backbone)
    per_cell = anchors_per_cell(model, features)
    levels = level_layout(features, per_cell)
    anchors = model.anchor_generator(ImageList(x, image_sizes), features)
    counts = [level.count for level in levels]
    detections = select_detections(model, cls_logits, box_outputs, extras, anchors, counts, image_sizes)
    return ssd.assemble_output(model, x, image_sizes, original_sizes, features, cls_logits, box_outputs,
                               anchors, levels, detections, extras)


__all__ = ["FCOS_BOX_OUTPUTS", "YOLO_FAMILY", "Family", "family_of", "traceable_backbone", "head_level",
           "num_classes_of", "dense_outputs", "select_detections", "run_detector", "detect_input"]
