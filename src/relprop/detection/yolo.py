"""Ultralytics YOLO (v8-style: anchor-free, DFL box head) read as a torchvision-like detector.

An Ultralytics ``DetectionModel`` runs its layers in a loop with index routes (``m.f``), keeps no
transform, and post-processes outside the model. :class:`YOLODetector` wraps one (the model is not
modified) with what relprop's detector families read:

- ``transform``: Ultralytics' letterbox (longer side to ``size``, centred, grey 114 padding; inputs
  in [0, 1], no normalization) and its inverse for the boxes (``scale_boxes``);
- ``backbone``: :class:`YOLOFeatures`, the layer loop up to the three maps the head reads; the
  engine traces it (C2f's chunk and concat, SPPF's pools, the neck's upsample + concat routes);
- ``head``: the ``Detect`` module (per level a class branch ``cv3`` and a box branch ``cv2``:
  two convs, then one Conv2d);
- post-processing: Ultralytics' own ``non_max_suppression`` on the head's own decoded output,
  asked for the kept anchor indices, so detections equal the model's.

The box branch predicts, per side l, t, r, b, 16 logits over distance bins (in strides from the
cell centre); the distance is the softmax's expectation (DFL). Its relevance seed is in
:func:`dfl_seed`. Classes follow torchvision's detectors: id 0 is "background", never labelled
(``benchmarks/train_yolo.py``), so labels, ``--num-classes`` and the contrast are the same.

Ultralytics is AGPL-3.0; it is the optional ``yolo`` extra, imported only when a YOLO is built.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from relprop.detection.ssd import DetectorOutput, assemble_output, level_layout
from relprop.errors import ConfigError, InputError

LETTERBOX_FILL = 114 / 255
"""Ultralytics' letterbox padding grey."""
YOLO_BOX_OUTPUTS = ("l", "t", "r", "b")
"""The distances (in strides) from the cell centre to the box's left, top, right and bottom."""


class LetterboxTransform(nn.Module):
    """Ultralytics' letterbox with torchvision's transform interface (``image_mean``/``image_std``,
    ``__call__`` -> ``(ImageList, targets)``, ``postprocess``). Bilinear resize of float images
    (Ultralytics resizes uint8 with OpenCV: values differ by rounding)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)
        self.min_size = (self.size,)
        self.image_mean, self.image_std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]

    def layout(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Resized (h, w) and padding (top, left) of an image, as Ultralytics' LetterBox."""
        gain = min(self.size / height, self.size / width)
        h, w = max(round(height * gain), 1), max(round(width * gain), 1)
        return h, w, round((self.size - h) / 2 - 0.1), round((self.size - w) / 2 - 0.1)

    def forward(self, images: Sequence[Tensor], targets=None) -> tuple[ImageList, object]:
        if targets is not None:
            raise InputError("relprop's YOLO transform is for inference; train with benchmarks/train_yolo.py")
        canvas = []
        for image in images:
            h, w, top, left = self.layout(int(image.shape[-2]), int(image.shape[-1]))
            resized = image if (h, w) == tuple(image.shape[-2:]) else F.interpolate(
                image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            frame = image.new_full((3, self.size, self.size), LETTERBOX_FILL)
            frame[:, top : top + h, left : left + w] = resized
            canvas.append(frame)
        return ImageList(torch.stack(canvas), [(self.size, self.size)] * len(canvas)), targets

    def postprocess(self, detections: list[dict[str, Tensor]], image_sizes: Sequence[tuple[int, int]],
                    original_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Boxes from the letterboxed canvas to the original image, clipped (``scale_boxes``)."""
        for det, (height, width) in zip(detections, original_sizes, strict=True):
            h, w, top, left = self.layout(height, width)  # each side's own gain, as scale_boxes
            gain = det["boxes"].new_tensor([w / width, h / height] * 2)
            boxes = (det["boxes"] - det["boxes"].new_tensor([left, top, left, top])) / gain
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            det["boxes"] = boxes
        return detections


class YOLOFeatures(nn.Module):
    """The layers before the head, run by their routes, returning the maps the head reads.

    Holds the model's own layer modules (no copies); a plain loop that ``torch.fx`` unrolls.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(list(model.model)[:-1])
        self.routes = [layer.f for layer in self.layers]
        self.outputs = [int(i) for i in model.model[-1].f]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        kept: list[Tensor] = []
        for layer, route in zip(self.layers, self.routes, strict=True):
            if route != -1:
                x = kept[route] if isinstance(route, int) else [x if j == -1 else kept[j] for j in route]
            x = layer(x)
            kept.append(x)
        return OrderedDict((str(level), kept[i]) for level, i in enumerate(self.outputs))


class YOLODetector(nn.Module):
    """An Ultralytics ``DetectionModel`` as a torchvision-like detector (see the module docstring).

    ``score_thresh``, ``nms_thresh`` and ``detections_per_img`` are Ultralytics' validation
    defaults (conf 0.001, IoU 0.7, 300), so mAP is measured as Ultralytics measures it.
    """

    def __init__(self, model: nn.Module, size: int = 256, score_thresh: float = 0.001, nms_thresh: float = 0.7,
                 detections_per_img: int = 300) -> None:
        super().__init__()
        head = model.model[-1]
        if not hasattr(head, "cv2") or getattr(head, "reg_max", 1) <= 1 or getattr(head, "end2end", False):
            raise ConfigError(f"relprop reads YOLO heads with a DFL box branch and NMS (YOLOv8's Detect); "
                              f"got an end-to-end or DFL-free {type(head).__name__}")
        self.model = model
        self.transform = LetterboxTransform(size)
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.__dict__["_features"] = YOLOFeatures(model)  # shares the model's modules: not a second state

    @property
    def backbone(self) -> YOLOFeatures:
        return self.__dict__["_features"]

    @property
    def head(self) -> nn.Module:
        return self.model.model[-1]

    @property
    def num_classes(self) -> int:
        return int(self.head.nc)

    def select(self, decoded: Tensor) -> list[dict[str, Tensor]]:
        """Ultralytics' ``non_max_suppression`` with the kept anchors (input-space boxes)."""
        from ultralytics.utils.nms import non_max_suppression  # deferred: the optional yolo extra

        rows, kept = non_max_suppression(decoded, self.score_thresh, self.nms_thresh, max_det=self.detections_per_img,
                                         nc=self.num_classes, return_idxs=True)
        return [{"boxes": r[:, :4], "scores": r[:, 4], "labels": r[:, 5].long(), "anchors": k.flatten().long()}
                for r, k in zip(rows, kept, strict=True)]

    @torch.no_grad()
    def forward(self, images: Sequence[Tensor], targets=None) -> list[dict[str, Tensor]]:
        if self.training or targets is not None:
            raise InputError("relprop's YOLO wrapper runs inference; train with benchmarks/train_yolo.py")
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        batch, _ = self.transform(images)
        out = self.model(batch.tensors)
        detections = self.select(out[0] if isinstance(out, (tuple, list)) else out)
        for det in detections:
            del det["anchors"]
        return self.transform.postprocess(detections, batch.image_sizes, sizes)


def dense_outputs(model: YOLODetector, x: Tensor, backbone: nn.Module | None = None
                  ) -> tuple[list[Tensor], Tensor, Tensor, dict[str, Tensor]]:
    """Features, class logits (N, A, K), the DFL distances l t r b (N, A, 4, in strides) and, in
    ``extras["box_logits"]`` (N, A, 64), the bin logits they come from; by the head's own modules."""
    features = list((backbone or model.backbone)(x).values())
    return (features, *_head_outputs(model, features)[1:])


def detect_input(model: YOLODetector, x: Tensor, image_sizes: list[tuple[int, int]],
                 original_sizes: list[tuple[int, int]], backbone: nn.Module | None = None) -> DetectorOutput:
    """YOLO's detections from the head's own output and NMS, with the logits and bins of the same call."""
    features = list((backbone or model.backbone)(x).values())
    decoded, logits, distances, extras = _head_outputs(model, features)
    levels = level_layout(features, [1] * len(features))
    return assemble_output(model, x, image_sizes, original_sizes, features, logits, distances, [], levels,
                           model.select(decoded), extras)


def _head_outputs(model: YOLODetector, features: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """One call of the ``Detect`` head: its decoded output (N, 4 + K, A), class logits (N, A, K),
    distances by its own DFL (N, A, 4) and the bin logits (N, A, 64)."""
    decoded, raw = model.head(features)
    bins = raw["boxes"]
    return (decoded, raw["scores"].transpose(1, 2), model.head.dfl(bins).transpose(1, 2),
            {"box_logits": bins.transpose(1, 2)})


def dfl_seed(logits: Tensor, side: int, reg_max: int = 16) -> tuple[slice, Tensor]:
    """The channels of side ``side`` and its seed on them: the gradient of the distance
    ``d = sum_b softmax(z)_b * b`` with respect to the bin logits, ``p_b (b - d)``.

    Why the gradient: the expectation is a softmax of 16 competing logits, so no z+/epsilon split
    keeps both sign and sum over the bins; its first-order change at the detection is what moves
    the box, and is what the direction check measures. ``logits`` (M, 4 * reg_max) at the anchor.
    """
    channels = slice(side * reg_max, (side + 1) * reg_max)
    p = logits[:, channels].softmax(-1)
    bins = torch.arange(reg_max, dtype=p.dtype, device=p.device)
    d = (p * bins).sum(-1, keepdim=True)
    return channels, p * (bins - d)


def build_yolo(arch: str, num_classes: int, size: int | None = None) -> YOLODetector:
    """A randomly initialised Ultralytics ``arch`` (its model YAML, e.g. ``yolov8n``) for
    ``num_classes`` classes (id 0 = background, never labelled), nothing downloaded."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    threads = os.environ.get("OMP_NUM_THREADS")  # Ultralytics sets it to 1 at import, for child processes too
    try:
        from ultralytics.nn.tasks import DetectionModel  # deferred: the yolo extra
    except ImportError:
        raise ConfigError(f"--arch {arch} needs Ultralytics: pip install 'relprop[yolo]' (AGPL-3.0)") from None
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    log = logging.getLogger("ultralytics")
    level = log.level
    log.setLevel(logging.WARNING)  # its "Overriding model.yaml nc=80" line is not news to our user
    try:
        model = DetectionModel(f"{arch}.yaml", nc=num_classes, verbose=False)
    finally:
        log.setLevel(level)
    return YOLODetector(model, size or 256).eval()


__all__ = ["LETTERBOX_FILL", "YOLO_BOX_OUTPUTS", "LetterboxTransform", "YOLOFeatures", "YOLODetector",
           "build_yolo", "dense_outputs", "detect_input", "dfl_seed"]
