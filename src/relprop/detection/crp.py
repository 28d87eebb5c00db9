"""Contrastive Relevance Propagation (CRP; Tsunakawa et al., IJCNN 2019) for torchvision's SSD,
RetinaNet and FCOS (each family read by :mod:`relprop.detection.families`).

A detection comes from one anchor n* of one head level. Its outputs are the class logits and the
four box offsets (cx, cy, w, h) of n*, computed by two convolutions on that level's feature map:
the classification layer and the localization layer. CRP explains one output at a time:

- class k*: seed ``e_k* - mean_{k != k*, k != background} e_k`` at n*'s logits, z+ through the
  classification layer. Rules are linear in the seed, so this single pass equals the difference of
  the per-class passes the paper describes; the map carries evidence for k* (positive) and for the
  other classes (negative) and sums to zero.
- box offset j: at the localization layer, the contributions ``a_i w_ij`` are split into their
  positive part (pushing t_j up: centre right / down, box wider / taller) and negative part, each
  normalized to relevance 1; the map is ``R+ - R-`` (so it also sums to zero).

Below the heads, the backbone is explained by :class:`relprop.core.interpreter.RelevanceEngine`: z+ in
feature layers, zB at the input (bounds from the detector's normalization), Relevance Splitting at
residual adds, L2Norm passed through, and fan-out (a map feeding a head and the next stage) summed.
Everything happens in the detector's own input space (after its transform); :func:`to_image`
resizes a map onto the original image for display.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from relprop.core.composites import Composite, resolve_composite
from relprop.core.interpreter import RelevanceEngine
from relprop.core.rules import get_rule
from relprop.detection.box_rules import BOX_RULES
from relprop.detection.families import (
    YOLO_FAMILY,
    family_of,
    head_level,
    num_classes_of,
    run_detector,
    traceable_backbone,
)
from relprop.detection.ssd import (
    BOX_OUTPUTS,
    AnchorPosition,
    DetectorOutput,
    HeadLevel,
    L2Norm,
    locate_anchor,
)
from relprop.detection.yolo import dfl_seed
from relprop.errors import InputError, TargetError

OUTPUTS = ("class", *BOX_OUTPUTS)
"""An SSD's (and RetinaNet's) outputs; ``CRP.outputs`` are the explained detector's (FCOS: l t r b ctr)."""


@dataclass(frozen=True)
class Request:
    """One map to compute: output ``output`` of detection ``detection`` of batch image ``image``.

    ``target_class`` None explains the detected class; another class is the "what-if" map of the
    same anchor. ``contrast`` None takes the explainer's default.
    """

    image: int
    detection: int
    output: str = "class"
    target_class: int | None = None
    contrast: bool | None = None


@dataclass
class DetectionExplanation:
    """The maps of one detection, keyed by output name, each (3, h, w) in the detector's input space."""

    image: int
    detection: int
    label: int
    score: float
    box: Tensor
    box_input: Tensor
    anchor: int
    level: int
    maps: dict[str, Tensor] = field(default_factory=dict)


class CRP:
    """Contrastive Relevance Propagation for a torchvision SSD, RetinaNet or FCOS, or a
    :class:`relprop.detection.yolo.YOLODetector` (eval mode, images in [0, 1]).

    ``contrast`` (default True) makes class maps contrastive; False gives plain LRP of the logit.
    ``include_background`` adds the background class to the classes contrasted against.
    ``box_contrast`` subtracts the mean map of the other three offsets from a box map.
    ``box_rule`` names the box maps' definition (`BOX_RULES`: "split", the seed's ``R+ - R-``;
    "signed", the head's contributions; "lrp0", signed with LRP-0 below, the one whose negative
    side passes the direction check, at the price of conservation), ``box_composite`` an optional
    composite for the backbone below the box head with "split" or "signed" (default: the class
    maps' composite).
    ``split``/``identity_skips`` configure Relevance Splitting in residual backbones; ``rules``
    adds engine rules for custom backbone layers (``{ModuleType: "pass"}``). These and
    ``input_rule`` (default zB) are a shortcut for ``composite=`` (a `relprop.Composite` for the
    backbone; not both); the detector's normalization fills its mean/std where it has none, and
    its L2Norm passes relevance unless the composite names a rule for it.
    """

    def __init__(
        self,
        detector: nn.Module,
        *,
        contrast: bool = True,
        include_background: bool = False,
        box_contrast: bool = False,
        box_rule: str = "split",
        box_composite: Composite | None = None,
        split: str | None = None,
        identity_skips: bool | None = None,
        input_rule: str | None = None,
        rules: Mapping[type | str, str] | None = None,
        chunk_size: int = 8,
        progress: bool = False,
        composite: Composite | None = None,
    ) -> None:
        self.family = family_of(detector)
        if box_rule not in BOX_RULES:
            raise InputError(f"box_rule {box_rule!r}: choose one of {', '.join(BOX_RULES)}")
        definition = BOX_RULES[box_rule]
        if definition.composite is not None:
            if box_composite is not None:
                raise InputError(f"box_rule {box_rule!r} sets the box composite itself; give your box_composite "
                                 f"with box_rule 'signed' or 'split'")
            box_composite = definition.composite()
            if rules:  # the user's rules for custom layers hold below the box head too
                box_composite = box_composite.replace(rules={**box_composite.rule_map(), **rules})
        self.detector = detector
        self.outputs = self.family.outputs
        self.box_rule = box_rule
        self.box_caveat = definition.caveat_for(self.family.name)
        self._box_head = definition.head
        self.contrast = contrast
        self.include_background = include_background
        self.box_contrast = box_contrast
        self.chunk_size = max(1, int(chunk_size))
        self.progress = progress
        self.backbone = traceable_backbone(detector)
        transform = detector.transform
        self.mean, self.std = list(transform.image_mean), list(transform.image_std)
        composite = resolve_composite(composite, Composite(input_rule="zb"), split=split,
                                      identity_skips=identity_skips, input_rule=input_rule, rules=rules)
        self.composite = composite.replace(
            rules={L2Norm: "pass", **composite.rule_map()},
            mean=composite.mean or self.mean, std=composite.std or self.std,
        )
        self.engine = RelevanceEngine(self.backbone, composite=self.composite)
        self.box_engine = self.engine
        self.box_composite = box_composite
        if box_composite is not None:
            box_composite = box_composite.replace(
                rules={L2Norm: "pass", **box_composite.rule_map()},
                mean=box_composite.mean or self.mean, std=box_composite.std or self.std,
            )
            self.box_engine = RelevanceEngine(self.backbone, composite=box_composite)
        self.num_classes = num_classes_of(detector)
        self._head_rule = get_rule("zplus")
        self._heads: dict[tuple[str, int], HeadLevel] = {}
        self._prefix_engines: dict[tuple[int, bool], RelevanceEngine] = {}

    # ------------------------------------------------------------------ public API

    def detect(self, images: Tensor | Sequence[Tensor]) -> DetectorOutput:
        """The detector's detections (torchvision's, in its order) with their anchors."""
        return run_detector(self.detector, images, self.backbone)

    def attribute(
        self,
        images: Tensor | Sequence[Tensor],
        detection: int = 0,
        output: str = "class",
        target_class: int | None = None,
        contrast: bool | None = None,
    ) -> Tensor:
        """Relevance (N, 3, h, w) in the detector's input space of detection ``detection`` of each image.

        ``detection`` indexes torchvision's detections of an image (descending score).
        """
        out = self.detect(images)
        requests = [
            Request(i, detection, output, target_class, contrast) for i in range(out.x.shape[0])
        ]
        return self.explain(out, requests)

    def explain_detections(
        self,
        images: Tensor | Sequence[Tensor],
        score_threshold: float = 0.5,
        max_detections: int = 10,
        outputs: Sequence[str] | None = None,
    ) -> list[list[DetectionExplanation]]:
        """Every detection scoring at least ``score_threshold`` (at most ``max_detections`` per
        image), explained for each of ``outputs`` (default: every output of the detector)."""
        outputs = self.outputs if outputs is None else outputs
        out = self.detect(images)
        found: list[list[DetectionExplanation]] = []
        requests = []
        for i, det in enumerate(out.detections):
            chosen = (
                (det["scores"] >= score_threshold).nonzero().flatten()[: max(0, max_detections)]
            )
            found.append([self._describe(out, i, int(d)) for d in chosen])
            requests += [Request(i, int(d), o) for d in chosen for o in outputs]
        maps = self.explain(out, requests) if requests else None
        by_key = {(r.image, r.detection, r.output): k for k, r in enumerate(requests)}
        for explanations in found:
            for e in explanations:
                e.maps = {o: maps[by_key[(e.image, e.detection, o)]] for o in outputs}
        return found

    def explain(self, out: DetectorOutput, requests: Sequence[Request]) -> Tensor:
        """Maps (len(requests), 3, h, w) for requests on an already computed detector output."""
        if not requests:
            raise InputError("nothing to explain: no requests")
        for r in requests:
            self._check(out, r)
        maps: list[Tensor | None] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        for k, r in enumerate(requests):  # class and box maps may go through different engines
            groups.setdefault(id(self._engine_for(r.output)), []).append(k)
        for indices in groups.values():
            engine = self._engine_for(requests[indices[0]].output)
            for chunk in self._chunks(indices):
                rows = self._explain_chunk(out, [requests[k] for k in chunk], engine)
                for k, row in zip(chunk, rows, strict=True):
                    maps[k] = row
        return torch.stack(maps)

    def _engine_for(self, output: str) -> RelevanceEngine:
        return self.engine if output == "class" else self.box_engine

    # ------------------------------------------------------------------ seeds

    def class_seed(self, k_star: int, contrast: bool | None = None) -> Tensor:
        """Seed (K,) on an anchor's logits: ``e_k*`` minus the mean of the contrasted classes."""
        contrast = self.contrast if contrast is None else contrast
        seed = torch.zeros(self.num_classes)
        seed[k_star] = 1.0
        others = [k for k in self._contrast_classes() if k != k_star]
        if contrast and others:
            seed[others] -= 1.0 / len(others)
        return seed

    def _contrast_classes(self) -> list[int]:
        first = 0 if self.include_background else 1
        return list(range(first, self.num_classes))

    def head_relevance(
        self, kind: str, position: AnchorPosition, feature: Tensor, vector: Tensor | int
    ) -> Tensor:
        """Relevance (M, C, H, W) at the high-level feature map of ``position``'s level.

        ``kind`` "class": ``vector`` (K,) or (M, K) is the seed on the anchor's logits, sent
        through the classification layer by z+. ``kind`` "box" (or FCOS's "ctr"): ``vector`` is
        the output index j; with ``box_rule="split"`` the layer's positive and negative
        contributions get relevance 1 each (``R+ - R-``), with ``"signed"`` each input gets its
        contribution ``a_i w_ij`` (LRP-0 seeded with the output's value: the map sums to the
        output minus its bias, and its sign says which way each input pushes).
        """
        head = self._head(kind, position.level)
        tower = self._prefix_engine(head, kind)
        record = None if tower is None else tower.forward(feature)
        a = feature if record is None else record.output
        if kind == "class":
            R = self._class_layer(head.conv, position, a, vector)
        else:
            columns = 1 if kind == "ctr" else 4
            signed = self._box_head == "signed"
            seed = self._dfl_seed(head.conv, a, position, int(vector)) if self.family is YOLO_FAMILY else None
            R = box_split(head.conv, a, position, int(vector), columns=columns, signed=signed, seed=seed)
        if record is None:
            return R
        result = tower.backward(record, R)
        return getattr(result, "input", result)

    def _dfl_seed(self, conv: nn.Conv2d, a: Tensor, p: AnchorPosition, side: int) -> tuple[slice, Tensor]:
        """YOLO's box seed: the gradient of side ``side``'s DFL distance on its 16 bin logits."""
        with torch.no_grad():
            logits = conv(a)[:, :, p.y, p.x]
        return dfl_seed(logits, side, conv.out_channels // 4)

    def _head(self, kind: str, level: int) -> HeadLevel:
        if (kind, level) not in self._heads:
            self._heads[kind, level] = head_level(self.detector, kind, level)
        return self._heads[kind, level]

    def propagate(self, x: Tensor, level_relevance: Sequence[tuple[int, Tensor]]) -> Tensor:
        """Relevance at the input of rows ``x`` (M, 3, h, w) from per-row feature-level relevance.

        ``level_relevance[m]`` is (level, R (C, H, W)) for row m.
        """
        record = self.engine.forward(x)
        return self._backward(self.engine, record, level_relevance)

    # ------------------------------------------------------------------ internals

    def _explain_chunk(
        self, out: DetectorOutput, chunk: Sequence[Request], engine: RelevanceEngine
    ) -> Tensor:
        x = out.x[[r.image for r in chunk]]
        record = engine.forward(x)
        features = _feature_list(record.output)
        seeds = []
        for m, r in enumerate(chunk):
            position = self._position(out, r)
            feature = features[position.level][m : m + 1]
            seeds.append((position.level, self._feature_seed(out, r, position, feature)[0]))
        return self._backward(engine, record, seeds)

    def _feature_seed(
        self, out: DetectorOutput, r: Request, position: AnchorPosition, feature: Tensor
    ) -> Tensor:
        if r.output == "class":
            k_star = self._class_of(out, r)
            return self.head_relevance(
                "class", position, feature, self.class_seed(k_star, r.contrast)
            )
        if r.output == "ctr":
            return self.head_relevance("ctr", position, feature, 0)
        j = self.family.box_outputs.index(r.output)
        R = self.head_relevance("box", position, feature, j)
        if self.box_contrast:
            others = [self.head_relevance("box", position, feature, o) for o in range(4) if o != j]
            R = R - torch.stack(others).mean(0)
        return R

    def _backward(
        self, engine: RelevanceEngine, record, level_relevance: Sequence[tuple[int, Tensor]]
    ) -> Tensor:
        features = _feature_list(record.output)
        seed = [torch.zeros_like(f) for f in features]
        for m, (level, R) in enumerate(level_relevance):
            seed[level][m] = seed[level][m] + R.reshape(seed[level][m].shape)
        result = engine.backward(record, _like_output(record.output, seed))
        return getattr(result, "input", result)

    def _class_layer(
        self, conv: nn.Conv2d, p: AnchorPosition, a: Tensor, vector: Tensor | int
    ) -> Tensor:
        K = self.num_classes
        if not isinstance(vector, Tensor):
            vector = F.one_hot(torch.as_tensor(vector), K).float()
        vector = vector.to(a).reshape(-1, K).expand(a.shape[0], K)
        R_out = a.new_zeros(a.shape[0], conv.out_channels, *_out_size(conv, a))
        R_out[:, p.box * K : (p.box + 1) * K, p.y, p.x] = vector
        return self._head_rule.relevance(conv, a, R_out)

    def _prefix_engine(self, head: HeadLevel, kind: str) -> RelevanceEngine | None:
        """The engine of the head's tower (z+; a box tower takes ``box_composite`` when given)."""
        if head.prefix is None:
            return None
        box = kind != "class" and self.box_composite is not None
        key = (id(head.prefix), box)  # RetinaNet/FCOS share one tower over all levels
        if key not in self._prefix_engines:
            if box:  # the tower's first layer sees features, not pixels: its type rule applies
                engine = RelevanceEngine(head.prefix, composite=self.box_composite.replace(input_rule=None))
            else:
                engine = RelevanceEngine(head.prefix, input_rule="zplus")
            self._prefix_engines[key] = engine
        return self._prefix_engines[key]

    def _position(self, out: DetectorOutput, r: Request) -> AnchorPosition:
        return locate_anchor(out.levels, int(out.detections[r.image]["anchors"][r.detection]))

    def _class_of(self, out: DetectorOutput, r: Request) -> int:
        if r.target_class is not None:
            return int(r.target_class)
        return int(out.detections[r.image]["labels"][r.detection])

    def _check(self, out: DetectorOutput, r: Request) -> None:
        if r.output not in self.outputs:
            raise TargetError(f"unknown output {r.output!r}; choose one of: {', '.join(self.outputs)}")
        if not 0 <= r.image < len(out.detections):
            raise TargetError(f"image {r.image} out of range (batch of {len(out.detections)})")
        count = len(out.detections[r.image]["scores"])
        if not 0 <= r.detection < count:
            raise TargetError(
                f"image {r.image} has {count} detection(s); detection={r.detection} does not exist"
            )
        if r.target_class is not None and not 0 <= r.target_class < self.num_classes:
            raise TargetError(
                f"target_class {r.target_class} out of range [0, {self.num_classes}) "
                "(0 is the background)"
            )

    def _chunks(self, requests: Sequence[int]) -> Iterator[Sequence[int]]:
        starts = range(0, len(requests), self.chunk_size)
        bar = tqdm(starts, desc="CRP", unit="chunk", disable=not self.progress or len(starts) < 2)
        for start in bar:
            yield requests[start : start + self.chunk_size]

    def _describe(self, out: DetectorOutput, image: int, d: int) -> DetectionExplanation:
        det = out.detections[image]
        anchor = int(det["anchors"][d])
        return DetectionExplanation(
            image=image,
            detection=d,
            label=int(det["labels"][d]),
            score=float(det["scores"][d]),
            box=det["boxes"][d].clone(),
            box_input=det["boxes_input"][d].clone(),
            anchor=anchor,
            level=locate_anchor(out.levels, anchor).level,
        )


def box_split(
    conv: nn.Conv2d, a: Tensor, p: AnchorPosition, offset: int, columns: int = 4,
    signed: bool = False, seed: tuple[slice, Tensor] | None = None,
) -> Tensor:
    """``R+ - R-`` at the localization layer's input for offset ``offset`` of anchor ``p``.

    The contributions ``z_i = a_i w_ij`` to output j (channel ``columns * box + offset`` at cell
    (y, x)) are split by sign; each part is normalized to relevance 1 (a part that is empty gets
    0). ``signed`` returns the contributions themselves (LRP-0 seeded with the output's value).
    ``seed`` (channels, weights (M, n)) replaces the one channel by a weighted set of channels
    (YOLO's DFL bins: :func:`relprop.detection.yolo.dfl_seed`).
    """
    grad_out = a.new_zeros(a.shape[0], conv.out_channels, *_out_size(conv, a))
    if seed is None:
        grad_out[:, columns * p.box + offset, p.y, p.x] = 1.0
    else:
        channels, weights = seed
        grad_out[:, channels, p.y, p.x] = weights.to(grad_out)
    w = torch.nn.grad.conv2d_input(
        a.shape,
        conv.weight.float(),
        grad_out,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
    )
    z = a * w
    if signed:
        return z
    positive, negative = z.clamp(min=0), (-z).clamp(min=0)
    return _normalized(positive) - _normalized(negative)


def _normalized(part: Tensor) -> Tensor:
    total = part.flatten(1).sum(1).view(-1, *([1] * (part.dim() - 1)))
    return torch.where(total > 0, part / total.clamp(min=1e-30), torch.zeros_like(part))


def _out_size(conv: nn.Conv2d, a: Tensor) -> tuple[int, int]:
    """Spatial output size of ``conv`` on input ``a``."""
    size = []
    for dim in range(2):
        n = a.shape[2 + dim]
        k, s, pad, d = (
            conv.kernel_size[dim],
            conv.stride[dim],
            conv.padding[dim],
            conv.dilation[dim],
        )
        size.append((n + 2 * pad - d * (k - 1) - 1) // s + 1)
    return size[0], size[1]


def _feature_list(output) -> list[Tensor]:
    return list(output.values()) if isinstance(output, Mapping) else [output]


def _like_output(output, maps: list[Tensor]):
    if isinstance(output, Mapping):
        return OrderedDict(zip(output.keys(), maps, strict=True))
    return maps[0]


def to_image(relevance: Tensor, size: tuple[int, int]) -> Tensor:
    """A (3, h, w) or (h, w) input-space map summed over channels and resized to ``size`` (H, W).

    Bilinear resizing is for display: it does not preserve the map's sum exactly.
    """
    heat = relevance.sum(0) if relevance.dim() == 3 else relevance
    return F.interpolate(heat[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


__all__ = ["CRP", "OUTPUTS", "Request", "DetectionExplanation", "box_split", "to_image"]
