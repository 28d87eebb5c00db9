"""Evaluation of detection explanations (`relprop evaluate --task detection`).

For every image of a folder of class sub-folders with ``boxes.txt`` (tin10's layout: one object per
image, ``file x0 y0 x1 y1`` in pixels, inclusive), the detector's highest-scoring true-positive
detection (right class, IoU >= 0.5 with the ground truth) is explained by each method, and:

- **energy**: share of the map's positive mass inside the ground-truth box (baseline: a uniform
  map, i.e. the box's share of the image);
- **pointing game**: is the map's maximum inside the box (baseline: the image centre point);
- **detection insertion / deletion**: pixels inserted into a black image / deleted to black in the
  map's order, 500 pixels per step, ties included (the classification protocol's frames); a
  frame's score is the max over its post-NMS detections of IoU with the explained box times the
  probability of the explained class at that detection's anchor; AUC by the trapezoid rule;
- **contrastiveness**: Pearson correlation between the map of the detected class and the map of
  the runner-up class of the same anchor (lower = the method tells classes apart);
- **direction** (box maps): replacing the 10 % most positive pixels of an offset's map by the
  image's mean colour should lower that offset (cx: centre moves left; cy: up; w: narrower;
  h: shorter), the 10 % most negative should raise it; CRP's box maps, gradient x input of the
  offset as a reference, 10 % random pixels as the chance level.

Methods: ``crp`` (contrastive class map), ``lrp-plain`` (plain LRP of the class logit, same rules, no
contrast), ``gradcam`` (Grad-CAM of the class logit of the detection's anchor, at the finest
feature map at or below the anchor's level with a grid of at least 7x7, ReLU, bilinear upsampling)
and ``gradxinput`` (gradient x input of that logit).
Everything is computed in the detector's input space.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou
from torchvision.transforms.functional import to_tensor
from tqdm import tqdm

from relprop.detection.crp import CRP, Request
from relprop.detection.families import dense_outputs, detect_input, head_level
from relprop.detection.ssd import BOX_OUTPUTS, DetectorOutput, locate_anchor, scale_box
from relprop.errors import InputError
from relprop.evaluation.metrics import auc, frame_masks, localization
from relprop.evaluation.results import append_jsonl, mean_std, write_atomic
from relprop.images import MAX_DECODED_PIXELS, load_image
from relprop.methods import canonical_name

METHODS = ("crp", "lrp-plain", "gradcam", "gradxinput")  # the registry's names: lrp-plain is plain LRP everywhere
DIRECTION_METHODS = ("crp", "gradxinput")
STEP = 500
TOP_FRACTION = 0.1
MIN_CAM_GRID = 7


@dataclass(frozen=True)
class Sample:
    """One evaluation image with its ground-truth class index (detector numbering) and box."""

    path: Path
    label: int
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, exclusive end


# ------------------------------------------------------------------ data


def read_samples(root: str | Path, classes: Sequence[str], per_class: int | None = None) -> list[Sample]:
    """Images of ``root/<class id>/`` with their boxes; ``classes`` is the detector's class list
    (index 0 = background). Inclusive pixel boxes become exclusive-end boxes."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such data folder")
    samples = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in classes:
            raise InputError(f"{folder}: class {folder.name!r} is not one of the detector's classes")
        boxes = folder / "boxes.txt"
        if not boxes.is_file():
            raise InputError(f"{folder}: no boxes.txt (lines 'file x0 y0 x1 y1')")
        rows = [line.split() for line in boxes.read_text().splitlines() if line.strip()]
        for row in rows[: per_class if per_class else None]:
            x0, y0, x1, y1 = (float(v) for v in row[1:5])
            samples.append(Sample(folder / row[0], classes.index(folder.name), (x0, y0, x1 + 1, y1 + 1)))
    if not samples:
        raise InputError(f"{root}: no images with boxes found")
    return samples


def load_tensor(path: Path) -> Tensor:
    """An image file as a float (3, H, W) tensor in [0, 1]."""
    return to_tensor(load_image(path, MAX_DECODED_PIXELS))  # the bound `relprop detect` has


# ------------------------------------------------------------------ maps


def gradcam_map(crp: CRP, out: DetectorOutput, image: int, detection: int, k: int) -> Tensor:
    """Grad-CAM (h, w) of class logit ``k`` of a detection's anchor, on the finest feature map at
    or below the anchor's level whose grid is at least 7x7 (a 1x1 top level gives no map)."""
    model = crp.detector
    position = locate_anchor(out.levels, int(out.detections[image]["anchors"][detection]))
    cam_level = max(
        [lv.index for lv in out.levels[: position.level + 1] if min(lv.height, lv.width) >= MIN_CAM_GRID]
        or [0]
    )
    x = out.x[image : image + 1]
    with torch.enable_grad():
        features = list(crp.backbone(x).values())
        head = head_level(model, "class", position.level)
        a = head.prefix(features[position.level]) if head.prefix is not None else features[position.level]
        logits = head.conv(a)
        K = crp.num_classes
        logit = logits[0, position.box * K + k, position.y, position.x]
        (grad,) = torch.autograd.grad(logit, features[cam_level])
    activation = features[cam_level].detach()
    weights = grad.mean((2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return cam[0, 0]


def anchor_gradient_x_input(crp: CRP, out: DetectorOutput, outputs: Callable[[tuple], Tensor],
                            targets: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Gradient x input (h, w) of image 0's dense output ``outputs(dense)[0, anchor of detection,
    column]`` for each ``(detection, column)`` of ``targets``: one forward, one backward each."""
    anchors = out.detections[0]["anchors"]
    x = out.x[:1].clone().requires_grad_(True)
    maps = []
    with torch.enable_grad():
        values = outputs(dense_outputs(crp.detector, x, crp.backbone))[0]
        for n, (detection, column) in enumerate(targets):
            (grad,) = torch.autograd.grad(values[int(anchors[detection]), column], x,
                                          retain_graph=n < len(targets) - 1)
            maps.append((grad * x).detach().sum(1)[0])
    return maps


def class_gradient_x_input(crp: CRP, out: DetectorOutput, targets: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Gradient x input (h, w) of class logit k at each (detection, k)'s anchor (image 0)."""
    return anchor_gradient_x_input(crp, out, _class_logits, targets)


def _class_logits(dense: tuple) -> Tensor:
    return dense[1]


def method_maps(
    crp: CRP, out: DetectorOutput, detection: int, classes: Sequence[int]
) -> dict[str, list[Tensor]]:
    """Per method, the 2-D maps (h, w) of each class in ``classes`` for one detection (image 0)."""
    requests = [Request(0, detection, "class", k, True) for k in classes]
    requests += [Request(0, detection, "class", k, False) for k in classes]
    lrp_maps = crp.explain(out, requests).sum(1)
    n = len(classes)
    return {
        "crp": list(lrp_maps[:n]),
        "lrp-plain": list(lrp_maps[n:]),
        "gradcam": [gradcam_map(crp, out, 0, detection, k) for k in classes],
        "gradxinput": class_gradient_x_input(crp, out, [(detection, k) for k in classes]),
    }


# ------------------------------------------------------------------ metrics


def correlation(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two maps (nan when one is constant)."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else float("nan")


def detection_scores(crp: CRP, frames: Tensor, box: Tensor, k: int, batch: int = 32) -> list[float]:
    """Per frame: max over post-NMS detections of IoU with ``box`` x p(k) at the detection's anchor."""
    scores = []
    for start in range(0, frames.shape[0], batch):
        out = detect_input(crp.detector, frames[start : start + batch], backbone=crp.backbone)
        probabilities = class_probabilities(crp, out.cls_logits)[..., k]
        for i, det in enumerate(out.detections):
            if len(det["anchors"]) == 0:
                scores.append(0.0)
                continue
            iou = box_iou(det["boxes_input"], box.view(1, 4)).flatten()
            scores.append(float((iou * probabilities[i, det["anchors"]]).max()))
    return scores


def class_probabilities(crp: CRP, logits: Tensor) -> Tensor:
    """Class probabilities from logits (..., K): SSD's softmax, RetinaNet's and FCOS's sigmoid."""
    return logits.softmax(-1) if crp.family.name == "ssd" else logits.sigmoid()


def insertion_deletion(
    crp: CRP, x: Tensor, heat: Tensor, box: Tensor, k: int, step: int = STEP
) -> dict[str, Any]:
    """Detection insertion and deletion AUCs of one map; removed pixels are black in pixel space."""
    masks = frame_masks(heat, step)[:, None]
    black = black_input(crp, x)
    deletion = torch.where(masks, black, x[None])
    insertion = torch.where(masks, x[None], black)
    del_curve = detection_scores(crp, deletion, box, k)
    ins_curve = detection_scores(crp, insertion, box, k)
    return {"insertion": auc(ins_curve, np.float64), "deletion": auc(del_curve, np.float64),
            "insertion_curve": ins_curve, "deletion_curve": del_curve}


def map_insertion_deletion(
    crp: CRP, x: Tensor, heat: Tensor, box: Tensor, k: int, energy: float | None, step: int = STEP
) -> dict[str, Any]:
    """`insertion_deletion`, except for a map with no positive mass (`energy` None, as
    `localization` gives it): its pixel order is all ties, which would insert or delete the whole
    image in the first frame, so it scores nothing (NaN, left out of every mean)."""
    if energy is None:
        return {"insertion": math.nan, "deletion": math.nan, "insertion_curve": [], "deletion_curve": []}
    return insertion_deletion(crp, x, heat, box, k, step)


def black_input(crp: CRP, x: Tensor) -> Tensor:
    """Pixel value 0 in the detector's normalized input space, shaped like ``x`` (3, h, w)."""
    mean = torch.tensor(crp.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(crp.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return ((0.0 - mean) / std).expand_as(x)


def direction_check(
    crp: CRP,
    out: DetectorOutput,
    detection: int,
    maps: dict[str, dict[str, Tensor]],
    generator: torch.Generator,
    fraction: float = TOP_FRACTION,
) -> dict[str, dict[str, dict[str, bool]]]:
    """Per method and offset map: does replacing its top positive / top negative pixels by the
    mean colour lower / raise the offset at the detection's anchor; ``random``: does replacing
    random pixels lower it (the chance level of ``positive``). Offsets are the detector's box
    outputs (SSD, RetinaNet: cx cy w h; FCOS: the distances l t r b)."""
    x = out.x[0]
    anchor = int(out.detections[0]["anchors"][detection])
    mean_colour = x.mean((1, 2), keepdim=True).expand_as(x)
    count = max(1, int(round(fraction * x.shape[1] * x.shape[2])))
    variants, keys = [], []
    names = crp.family.box_outputs
    for j, name in enumerate(names):
        variants.append(torch.where(_random_mask(x.shape[1:], count, generator)[None], mean_colour, x))
        keys.append((None, name, "random", j))
        for method, box_maps in maps.items():
            heat = box_maps[name]
            for kind, mask in (("positive", _top(heat, count)), ("negative", _top(-heat, count))):
                variants.append(torch.where(mask[None], mean_colour, x))
                keys.append((method, name, kind, j))
    with torch.no_grad():
        offsets = raw_box_outputs(dense_outputs(crp.detector, torch.stack(variants), crp.backbone))
    before = out.extras.get("box_raw", out.bbox_regression)[0, anchor]
    result: dict[str, dict[str, dict[str, bool]]] = {m: {o: {} for o in names} for m in maps}
    for row, (method, name, kind, j) in enumerate(keys):
        after, prior = float(offsets[row, anchor, j]), float(before[j])
        moved = after > prior if kind == "negative" else after < prior
        for m in [method] if method is not None else list(maps):
            result[m][name][kind] = moved
    return result


def raw_box_outputs(dense: tuple) -> Tensor:
    """The box outputs a box map explains: FCOS's distances before their ReLU, others as they are."""
    return dense[3].get("box_raw", dense[2])


def offset_gradient_x_input(crp: CRP, out: DetectorOutput, detection: int) -> dict[str, Tensor]:
    """Gradient x input (h, w) of each box offset of a detection's anchor: the reference the
    direction check compares CRP's box maps with."""
    names = crp.family.box_outputs
    maps = anchor_gradient_x_input(crp, out, raw_box_outputs, [(detection, j) for j in range(len(names))])
    return dict(zip(names, maps, strict=True))


def _top(heat: Tensor, count: int) -> Tensor:
    """The ``count`` highest pixels, only where they are > 0."""
    flat = heat.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    values, index = flat.topk(count)
    mask[index[values > 0]] = True
    return mask.view(heat.shape)


def _random_mask(shape: Sequence[int], count: int, generator: torch.Generator) -> Tensor:
    flat = torch.zeros(int(np.prod(shape)), dtype=torch.bool)
    flat[torch.randperm(flat.numel(), generator=generator)[:count]] = True
    return flat.view(*shape)


# ------------------------------------------------------------------ driver


def true_positive(out: DetectorOutput, sample: Sample, iou_threshold: float = 0.5) -> int | None:
    """Index of the highest-scoring detection of the right class with IoU >= threshold, or None."""
    det = out.detections[0]
    if len(det["scores"]) == 0:
        return None
    gt = torch.tensor(sample.box, dtype=det["boxes"].dtype).view(1, 4)
    iou = box_iou(det["boxes"], gt).flatten()
    hits = ((det["labels"] == sample.label) & (iou >= iou_threshold)).nonzero().flatten()
    return int(hits[0]) if len(hits) else None


def evaluate_sample(
    crp: CRP, sample: Sample, generator: torch.Generator, methods: Sequence[str] = METHODS,
    step: int = STEP,
) -> dict[str, Any]:
    """Every metric of one image (its record in results.jsonl)."""
    image = load_tensor(sample.path)
    out = crp.detect([image])
    det = out.detections[0]
    record: dict[str, Any] = {"image": str(sample.path), "label": sample.label,
                              "top1": int(det["labels"][0]) if len(det["labels"]) else None}
    d = true_positive(out, sample)
    record["true_positive"] = d is not None
    if d is None:
        return record
    k_star = int(det["labels"][d])
    anchor = int(det["anchors"][d])
    probabilities = out.cls_logits[0, anchor].softmax(-1)
    ranked = [int(k) for k in probabilities.argsort(descending=True) if int(k) not in (0, k_star)]
    runner_up = ranked[0]
    size = tuple(out.x.shape[-2:])
    gt_input = scale_box(torch.tensor(sample.box), out.original_sizes[0], size)
    explained = det["boxes_input"][d]
    (baseline,) = localization(torch.zeros(1, *size), [gt_input])  # the centre-point/uniform scores
    record.update({
        "detection": d, "score": float(det["scores"][d]), "anchor": anchor,
        "level": int(det["levels"][d]), "runner_up": runner_up,
        "runner_up_prob": float(probabilities[runner_up]),
        "box_area_share": baseline["centre_energy"],
        "centre_hit": bool(baseline["centre_pointing"]),
    })
    maps = method_maps(crp, out, d, [k_star, runner_up])
    record["methods"] = {}
    for name in methods:
        heat, other = maps[name]
        (box,) = localization(heat[None], [gt_input], pointing="first")
        entry = {"energy": math.nan if box["energy"] is None else box["energy"],
                 "pointing": bool(box["pointing"]), "contrast_r": correlation(heat, other)}
        entry.update(map_insertion_deletion(crp, out.x[0], heat, explained, k_star, box["energy"], step))
        entry["id"] = entry["insertion"] - entry["deletion"]
        record["methods"][name] = entry
    names = crp.family.box_outputs
    box_maps = crp.explain(out, [Request(0, d, o) for o in names]).sum(1)
    direction_maps = {"crp": dict(zip(names, box_maps, strict=True)),
                      "gradxinput": offset_gradient_x_input(crp, out, d)}
    record["direction"] = direction_check(crp, out, d, direction_maps, generator)
    return record


def summarize(records: Sequence[dict[str, Any]], methods: Sequence[str] = METHODS) -> dict[str, Any]:
    """Means over true-positive images, with the baselines and the direction rates."""
    tps = [r for r in records if r.get("true_positive")]
    summary: dict[str, Any] = {
        "images": len(records),
        "true_positives": len(tps),
        "top1_correct_class": _mean([r["top1"] == r["label"] for r in records]),
        "baselines": {
            "uniform_energy": _mean([r["box_area_share"] for r in tps]),
            "centre_point_pointing": _mean([r["centre_hit"] for r in tps]),
        },
        "methods": {},
        "direction": {},
    }
    for name in methods:
        entries = [r["methods"][name] for r in tps if name in r.get("methods", {})]
        summary["methods"][name] = {
            key: _mean([e[key] for e in entries])
            for key in ("energy", "pointing", "insertion", "deletion", "id", "contrast_r")
        }
        summary["methods"][name]["n"] = len(entries)
        summary["methods"][name]["empty_maps"] = sum(_missing(e["energy"]) for e in entries)
    for method in DIRECTION_METHODS:
        summary["direction"][method] = {}
        offsets = next((list(r["direction"][method]) for r in tps if "direction" in r), list(BOX_OUTPUTS))
        for offset in offsets:
            checks = [r["direction"][method][offset] for r in tps if "direction" in r]
            summary["direction"][method][offset] = {
                kind: _mean([c[kind] for c in checks]) for kind in ("positive", "negative", "random")
            }
    return summary


def _missing(value: Any) -> bool:
    return value is None or math.isnan(float(value))


def _mean(values: Sequence[Any]) -> float:
    """Over the values that exist: an empty map (no positive mass) has no energy, insertion or
    deletion, as in the scene evaluation (`scenes._metric`)."""
    return mean_std([float(v) for v in values if not _missing(v)])[0]


DIRECTION_WORDS = {"cx": "left", "cy": "up", "w": "narrower", "h": "shorter",
                   "l": "left edge in", "t": "top edge in", "r": "right edge in", "b": "bottom edge in"}
OPPOSITE_WORDS = {"cx": "right", "cy": "down", "w": "wider", "h": "taller",
                  "l": "left edge out", "t": "top edge out", "r": "right edge out", "b": "bottom edge out"}


def summary_markdown(summary: dict[str, Any], command: str | None = None) -> str:
    """The tables of docs/results.md."""
    lines = []
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"{summary['images']} images, {summary['true_positives']} with a true-positive detection "
        f"(right class, IoU ≥ 0.5); top-scoring detection of the right class: "
        f"{summary['top1_correct_class']:.1%}.",
        "",
        "| method | n (empty maps) | energy in box ↑ | pointing game ↑ | det. insertion ↑ | det. deletion ↓ "
        "| ins − del ↑ | corr(top, runner-up) ↓ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary["methods"].items():
        lines.append(
            f"| {name} | {m['n']} ({m['empty_maps']}) | {m['energy']:.3f} | {m['pointing']:.3f} | {m['insertion']:.3f} "
            f"| {m['deletion']:.3f} | {m['id']:.3f} | {m['contrast_r']:.3f} |"
        )
    base = summary["baselines"]
    lines.append(
        f"| baseline | | {base['uniform_energy']:.3f} (uniform map) "
        f"| {base['centre_point_pointing']:.3f} (centre point) | | | | |"
    )
    lines += [
        "",
        "Direction of the box maps: share of true positives whose offset at the explained anchor "
        "moved as the map says after replacing 10 % of the pixels (the map's most positive, or "
        "most negative) by the image's mean colour; gradient × input of the offset as a "
        "reference; random pixels for chance level:",
        "",
        "| offset | CRP: top + removed | CRP: top − removed | grad×input: top + removed "
        "| grad×input: top − removed | random 10 % removed |",
        "|---|---|---|---|---|---|",
    ]
    direction = summary["direction"]
    for offset in direction["crp"]:
        c, g = direction["crp"][offset], direction["gradxinput"][offset]
        down, up = DIRECTION_WORDS[offset], OPPOSITE_WORDS[offset]
        lines.append(
            f"| {offset} | {down} {c['positive']:.1%} | {up} {c['negative']:.1%} "
            f"| {down} {g['positive']:.1%} | {up} {g['negative']:.1%} | {down} {c['random']:.1%} |"
        )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class DetectionEvalConfig:
    """What `relprop evaluate --task detection` asks for (the CLI builds it; the library never
    sees the command line)."""

    data: Path
    out: Path | None = None
    per_class: int | None = None
    limit: int | None = None
    methods: tuple[str, ...] = METHODS
    step: int = STEP
    seed: int = 0
    progress: bool = True
    command: str | None = None
    crp_options: dict[str, Any] = field(default_factory=dict)


def check_methods(names: Sequence[str]) -> tuple[str, ...]:
    """The registry's names of the requested detection methods; an unknown one is one clear line
    that lists the valid names (never silently dropped)."""
    resolved = tuple(dict.fromkeys(canonical_name(n) for n in names))
    unknown = [n for n in names if canonical_name(n) not in METHODS]
    if unknown or not resolved:
        raise InputError(f"unknown detection method {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"--task detection knows: {', '.join(METHODS)}")
    return resolved


def evaluate_detection(model: torch.nn.Module, classes: Sequence[str],
                       config: DetectionEvalConfig) -> dict[str, Any]:
    """Evaluate CRP, plain LRP and Grad-CAM on a detector; write results.jsonl, summary.json and
    summary.md under ``config.out`` (when given) and return the summary.

    ``classes`` is the detector's class list, background first (a checkpoint's ``classes``).
    """
    methods = check_methods(config.methods)
    samples = read_samples(config.data, list(classes), config.per_class)[: config.limit or None]
    crp = CRP(model.eval(), **config.crp_options)
    generator = torch.Generator().manual_seed(config.seed)
    records = []
    folder = config.out
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "results.jsonl", b"")  # detection does not resume: a fresh file
    started = time.time()
    for sample in tqdm(samples, desc="evaluate detection", unit="image", disable=not config.progress,
                       file=sys.stderr):
        record = evaluate_sample(crp, sample, generator, methods, config.step)
        if folder is not None:
            record["image"] = str(Path(record["image"]).relative_to(Path(config.data)))
            append_jsonl(folder / "results.jsonl", record)
        records.append(record)
    summary = summarize(records, methods)
    summary["seconds"] = round(time.time() - started, 1)
    if folder is not None:
        write_atomic(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_atomic(folder / "summary.md", summary_markdown(summary, config.command))
    return summary
