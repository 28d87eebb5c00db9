"""An SSD's detections explained by Contrastive Relevance Propagation: the pipeline behind
`relprop detect`.

`detect_images(config, model, info)` runs the detector on every image and explains each
detection scoring at least `score_threshold` (at most `max_detections`, best first): its class
map and its four box maps (cx, cy, w, h). It writes under `config.out`, per image,
`detections.png`, `det<i>.png` (and with `save_maps` `det<i>_<map>.npy`); for the run
`detections.jsonl` and `manifest.json`. An unreadable image is named on stderr and the others go on.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms.functional import to_tensor
from tqdm import tqdm

from relprop.core.splitting import SPLITS
from relprop.detection.box_rules import BOX_RULES
from relprop.detection.crp import CRP, Request, to_image
from relprop.detection.families import num_classes_of
from relprop.errors import ImageError, RelpropError, TargetError
from relprop.images import MAX_DECODED_PIXELS, load_image
from relprop.modelinfo import ModelInfo
from relprop.models import class_names_of
from relprop.pipelines.inputs import plan_jobs
from relprop.pipelines.outputs import Manifest, writing
from relprop.targets import as_index, show_option
from relprop.viz import draw_detections, save_detection_panel

# Relevance passes these unchanged, as it passes ReLU (SSDLite's MobileNetV3 uses Hardswish).
ACTIVATIONS_PASSED_THROUGH = {torch.nn.Hardswish: "pass"}


@dataclass(frozen=True)
class DetectConfig:
    """What `relprop detect` was asked for, checked when made (one clear line)."""

    inputs: tuple[str, ...]
    out: Path
    score_threshold: float = 0.5
    max_detections: int = 5
    target: str | None = None  # what-if: this class (index, id or name) for every detected box
    contrast: bool = True
    include_background: bool = False
    box_contrast: bool = False
    split: str = "ratio"
    box_rule: str = "split"
    save_maps: bool = False
    device: Any = "cpu"

    def __post_init__(self) -> None:
        if self.max_detections < 1:
            raise RelpropError(f"--max-detections {self.max_detections}: must be at least 1")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise RelpropError(f"--score-threshold {self.score_threshold}: must be in [0, 1]")
        if self.split not in SPLITS:
            raise RelpropError(f"--split {self.split!r}: choose one of {', '.join(SPLITS)}")
        if self.box_rule not in BOX_RULES:
            raise RelpropError(f"--box-rule {self.box_rule!r}: choose one of {', '.join(BOX_RULES)}")


@dataclass(frozen=True)
class DetectionRecord:
    """One explained detection: a line of detections.jsonl."""

    image: str
    output: str
    detection: int
    label: int
    class_name: str
    score: float
    box: list[float]  # x0, y0, x1, y1 in original pixels
    anchor: int
    level: int
    explained_class: int
    panel: str  # relative to OUT

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "output": self.output, "detection": self.detection,
                "label": self.label, "class_name": self.class_name, "score": self.score,
                "box": list(self.box), "anchor": self.anchor, "level": self.level,
                "explained_class": self.explained_class, "panel": self.panel}


@dataclass
class DetectSummary:
    """What a run did: the detections explained, the images without any, the inputs that failed."""

    out: Path
    records: list[DetectionRecord] = field(default_factory=list)
    inputs: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def detect_images(config: DetectConfig, model: Any, info: ModelInfo,
                  on_image: Callable[[Path, list[DetectionRecord]], None] | None = None,
                  ) -> DetectSummary:
    """Detect and explain every image of `config.inputs`; `on_image(path, records)` is told of
    each image once its files are written (the CLI prints its lines)."""
    out = Path(config.out)
    model.to(config.device)
    names = class_names_of(info, num_classes_of(model), detector=True)
    target = parse_class(config.target, info, names)
    crp = CRP(model, contrast=config.contrast, include_background=config.include_background,
              box_contrast=config.box_contrast, split=config.split, box_rule=config.box_rule,
              rules=ACTIVATIONS_PASSED_THROUGH)
    jobs, failures = plan_jobs(config.inputs, "detect", exclude=out)
    summary = DetectSummary(out, inputs=len(jobs) + len(failures), failures=failures)
    manifest = Manifest(out, "detect")
    with writing(out), open(manifest.add(out / "detections.jsonl"), "w", encoding="utf-8") as log:
        for path, name in tqdm(jobs, unit="image", desc="detect", file=sys.stderr):
            try:
                image = to_tensor(load_image(path, MAX_DECODED_PIXELS))
            except ImageError as error:
                summary.failures.append(str(error))
                tqdm.write(f"relprop detect: error: {error}", file=sys.stderr)
                continue
            result = crp.detect([image.to(config.device)])
            det = result.detections[0]
            chosen = _chosen(det["scores"], config.score_threshold, config.max_detections)
            requests = [Request(0, d, o, target) for d in chosen for o in crp.outputs]
            maps = crp.explain(result, requests).cpu() if requests else None
            problem = _non_finite(result, maps)
            if problem:  # NaN is an error, never a number (nor "no detection")
                summary.failures.append(f"{path}: {problem}; not explained")
                tqdm.write(f"relprop detect: error: {summary.failures[-1]}", file=sys.stderr)
                continue
            folder = out / name
            folder.mkdir(parents=True, exist_ok=True)
            records = _write_image(folder, name, path, image, det, chosen, maps, names, target,
                                   config.save_maps, manifest, crp.outputs, crp.box_caveat)
            for record in records:
                log.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
            summary.records += records
            if on_image is not None:
                on_image(path, records)
    with writing(out):
        manifest.finish()
    return summary


def parse_class(text: str | None, info: ModelInfo, names: Sequence[str]) -> int | None:
    """`--target-class` as an index, a class id (e.g. a wnid) or a class name."""
    if text is None:
        return None
    index = as_index(text)
    if index is not None:
        if not 0 <= index < len(names):
            raise TargetError(f"--target-class {index}: the detector has classes 0..{len(names) - 1}")
        return index
    wanted = text.strip().lower()
    for labels in (info.classes or [], info.class_names or [], names):
        lowered = [str(label).lower() for label in labels]
        if wanted in lowered and len(lowered) == len(names):
            return lowered.index(wanted)
    raise TargetError(f"--target-class {show_option(text)}: not a class index, id or name of this detector")


def _non_finite(result: Any, maps: Any) -> str | None:
    """What is NaN or infinite in a detection and its maps (None: nothing)."""
    if not (bool(torch.isfinite(result.cls_logits).all())
            and bool(torch.isfinite(result.bbox_regression).all())):
        return "the detector's output is NaN or infinite for this image (check the weights)"
    if maps is not None and not bool(torch.isfinite(maps).all()):
        return "the relevance maps hold NaN or infinite values"
    return None


def _chosen(scores: Any, threshold: float, cap: int) -> list[int]:
    return [int(d) for d in (scores >= threshold).nonzero().flatten()[:cap]]


def _write_image(folder: Path, name: str, path: Path, image: Any, det: dict, chosen: Sequence[int],
                 maps: Any, names: Sequence[str], target: int | None,
                 save_maps: bool, manifest: Manifest,
                 outputs: Sequence[str], box_caveat: str) -> list[DetectionRecord]:
    """Drawings, panels and (optionally) raw maps of one image; its detections.jsonl records."""
    rgb = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    size = tuple(image.shape[-2:])
    boxes = [det["boxes"][d].tolist() for d in chosen]
    labels = [int(det["labels"][d]) for d in chosen]
    scores = [float(det["scores"][d]) for d in chosen]
    captions = [f"{i}: {names[k]} {s:.0%}" for i, (k, s) in enumerate(zip(labels, scores, strict=True))]
    draw_detections(manifest.add(folder / "detections.png"), rgb, boxes, captions)
    records = []
    for i, d in enumerate(chosen):
        heats = {o: to_image(maps[i * len(outputs) + j], size).numpy()
                 for j, o in enumerate(outputs)}
        explained = labels[i] if target is None else target
        title = f"{path.name} · detection {d}: {names[labels[i]]} {scores[i]:.0%}"
        if explained != labels[i]:
            title += f" · explaining {names[explained]}"
        panel = folder / f"det{d}.png"
        save_detection_panel(manifest.add(panel), rgb, boxes[i], heats, title, names[explained], box_caveat)
        if save_maps:
            for o, heat in heats.items():
                np.save(manifest.add(folder / f"det{d}_{o}.npy"), heat.astype(np.float32))
        records.append(DetectionRecord(
            image=str(path), output=name, detection=d, label=labels[i],
            class_name=names[labels[i]], score=round(scores[i], 6),
            box=[round(v, 2) for v in boxes[i]], anchor=int(det["anchors"][d]),
            level=int(det["levels"][d]), explained_class=explained,
            panel=panel.relative_to(folder.parent).as_posix(),
        ))
    return records
