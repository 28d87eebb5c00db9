"""Class-contrastive evaluation on multi-object scenes (`relprop evaluate --task detection --data
SCENES.json`).

A scene holds several objects of different classes (COCO detection json, as
benchmarks/make_scenes.py writes it). In each scene the two highest-scoring true positives of
different classes (right class, IoU >= 0.5 with an object) are explained, each for its own class,
by every method; a class map should put its energy in its own object's box, not in the other's.
Per map:

- **energy own / other**: share of the map's positive mass in its own object's box and in the
  other explained object's box (a pixel counts when its centre is inside);
- **pointing game**: is the map's maximum (first in raster order) in its own box;
- **detection insertion / deletion**: as in :mod:`relprop.evaluation.detection` (frames of
  ``step`` pixels in the map's order, removed pixels black; a frame's score is the best IoU with
  the explained box times p(class) at that detection's anchor).

A scene's value is the mean over its two maps, so the statistics resample scenes, not maps (the
two maps of a scene share an image): mean with a 95 % bootstrap CI, own − other as a paired
difference, and every method against CRP paired over scenes (relprop.evaluation.statistics).
Methods: ``crp`` (contrastive class map), ``lrp-plain`` (the same rules, no contrast), ``gradcam``
and ``gradxinput`` (gradient x input of the class logit at the detection's anchor). The run is
resumable: scenes already in OUT/results.jsonl are not redone; an unreadable image is one line on
stderr and in OUT/skipped.jsonl.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_iou
from tqdm import tqdm

from relprop.detection.crp import CRP, Request
from relprop.detection.ssd import DetectorOutput, scale_box
from relprop.errors import InputError, RelpropError
from relprop.evaluation.detection import (
    METHODS,
    check_methods,
    class_gradient_x_input,
    gradcam_map,
    load_tensor,
    map_insertion_deletion,
)
from relprop.evaluation.metrics import localization
from relprop.evaluation.results import append_jsonl, read_jsonl, write_atomic
from relprop.evaluation.statistics import mean_sem_ci, paired_comparison

SCENE_METHODS = METHODS
SCENE_METRICS = ("own", "other", "own_minus_other", "pointing", "insertion", "deletion", "id")
STEP = 4096  # pixels per frame: 16 frames at 256 x 256 (each frame is a detector forward)
IOU = 0.5


@dataclass(frozen=True)
class SceneObject:
    label: int  # detector class index
    box: tuple[float, float, float, float]  # x0, y0, x1, y1, original pixels, exclusive end


@dataclass(frozen=True)
class Scene:
    path: Path
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class SceneEvalConfig:
    """What the scene evaluation asks for (the CLI builds it)."""

    data: Path  # a COCO detection json; file names are relative to its folder
    out: Path | None = None
    limit: int | None = None
    methods: tuple[str, ...] = SCENE_METHODS
    step: int = STEP
    progress: bool = True
    command: str | None = None


# ------------------------------------------------------------------ data


def read_scenes(path: str | Path, classes: Sequence[str], class_names: Sequence[str] = ()) -> list[Scene]:
    """The scenes of a COCO detection json, their categories mapped to the detector's classes
    (by wnid, name or id, in that order; one line naming the first category that fits none)."""
    path = Path(path)
    try:
        coco = json.loads(path.read_text())
        images, annotations, categories = coco["images"], coco["annotations"], coco["categories"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path}: not a COCO detection json with images, annotations and "
                         f"categories ({type(error).__name__})") from None
    try:
        scenes = _scenes(path, images, annotations, categories, classes, class_names)
    except RelpropError:
        raise
    except (KeyError, TypeError, ValueError) as error:  # a malformed entry: named, on one line
        raise InputError(f"{path}: malformed COCO entry ({type(error).__name__}: {error})") from None
    if not scenes:
        raise InputError(f"{path}: no images")
    return scenes


def _scenes(path: Path, images: list, annotations: list, categories: list, classes: Sequence[str],
            class_names: Sequence[str]) -> list[Scene]:
    index = {int(c["id"]): _class_index(c, classes, class_names, path) for c in categories}
    objects: dict[int, list[SceneObject]] = {}
    for ann in annotations:
        x, y, w, h = (float(v) for v in ann["bbox"])
        if int(ann["category_id"]) not in index:
            raise InputError(f"{path}: annotation {ann.get('id')} has category {ann['category_id']}, "
                             "which is not among the categories")
        objects.setdefault(int(ann["image_id"]), []).append(
            SceneObject(index[int(ann["category_id"])], (x, y, x + w, y + h)))
    return [Scene(path.parent / meta["file_name"], tuple(objects.get(int(meta["id"]), ()))) for meta in images]


def _class_index(category: Mapping[str, Any], classes: Sequence[str], names: Sequence[str], path: Path) -> int:
    for key, known in (("wnid", classes), ("name", classes), ("name", names)):
        if category.get(key) is not None and str(category[key]) in list(known):
            return list(known).index(str(category[key]))
    number = int(category["id"])
    if all(str(c) == str(i) for i, c in enumerate(classes)) and 0 < number < len(classes):
        return number
    raise InputError(f"{path}: category {category.get('name', number)!r} is not one of the "
                     f"detector's classes ({', '.join(map(str, list(names or classes)[1:6]))}, ...)")


# ------------------------------------------------------------------ one scene


def explained_pair(out: DetectorOutput, scene: Scene, iou: float = IOU) -> list[tuple[int, SceneObject]]:
    """The two best-scoring true positives of different classes, each with its object ([] when
    the scene has fewer)."""
    det = out.detections[0]
    chosen: list[tuple[int, SceneObject]] = []
    for d in range(len(det["scores"])):
        label = int(det["labels"][d])
        if any(label == obj.label for _, obj in chosen):
            continue
        for obj in scene.objects:  # the chosen labels differ, so the objects do
            if obj.label == label:
                gt = torch.tensor([obj.box], dtype=det["boxes"].dtype)
                if float(box_iou(det["boxes"][d : d + 1], gt)) >= iou:
                    chosen.append((d, obj))
                    break
        if len(chosen) == 2:
            return chosen
    return []


def scene_maps(crp: CRP, out: DetectorOutput, pair: Sequence[tuple[int, SceneObject]],
               methods: Sequence[str]) -> dict[str, list[Tensor]]:
    """Per method, the 2-D class map (h, w) of each explained detection, for its own class."""
    det = out.detections[0]
    labels = [int(det["labels"][d]) for d, _ in pair]
    maps: dict[str, list[Tensor]] = {}
    lrp = [m for m in ("crp", "lrp-plain") if m in methods]
    if lrp:
        requests = [Request(0, d, "class", None, m == "crp") for m in lrp for d, _ in pair]
        heats = crp.explain(out, requests).sum(1)
        for i, m in enumerate(lrp):
            maps[m] = list(heats[i * len(pair) : (i + 1) * len(pair)])
    if "gradcam" in methods:
        maps["gradcam"] = [gradcam_map(crp, out, 0, d, k) for (d, _), k in zip(pair, labels, strict=True)]
    if "gradxinput" in methods:
        maps["gradxinput"] = class_gradient_x_input(crp, out, [(d, k) for (d, _), k in zip(pair, labels, strict=True)])
    return {m: maps[m] for m in methods}


def evaluate_scene(crp: CRP, scene: Scene, image: Tensor, methods: Sequence[str] = SCENE_METHODS,
                   step: int = STEP) -> dict[str, Any]:
    """Every metric of one scene (its line in results.jsonl)."""
    out = crp.detect([image])
    pair = explained_pair(out, scene)
    record: dict[str, Any] = {"image": str(scene.path), "objects": len(scene.objects), "pair": bool(pair)}
    if not pair:
        return record
    det, size = out.detections[0], tuple(out.x.shape[-2:])
    boxes = [scale_box(torch.tensor(obj.box), out.original_sizes[0], size) for _, obj in pair]
    record["detections"] = [{"detection": d, "label": int(det["labels"][d]), "score": float(det["scores"][d]),
                             "anchor": int(det["anchors"][d])} for d, _ in pair]
    record["methods"] = {}
    for method, heats in scene_maps(crp, out, pair, methods).items():
        entries = []
        for i, heat in enumerate(heats):
            if not bool(torch.isfinite(heat).all()):
                raise InputError(f"{scene.path}: the {method} map is NaN or infinite")
            own, other = localization(torch.stack([heat, heat]), [boxes[i], boxes[1 - i]], pointing="first")
            (d, _), k = pair[i], record["detections"][i]["label"]
            curves = map_insertion_deletion(crp, out.x[0], heat, det["boxes_input"][d], k, own["energy"], step)
            entries.append({"own": _number(own["energy"]), "other": _number(other["energy"]),
                            "pointing": own["pointing"], "insertion": curves["insertion"],
                            "deletion": curves["deletion"]})
        record["methods"][method] = entries
    return record


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


# ------------------------------------------------------------------ summary


def scene_values(records: Sequence[dict[str, Any]], method: str, metric: str) -> list[float]:
    """One value per scene with a pair (the mean over its two maps), in record order."""
    values = []
    for record in records:
        if not record.get("pair") or method not in record.get("methods", {}):
            continue
        per_map = [_metric(entry, metric) for entry in record["methods"][method]]
        values.append(sum(per_map) / len(per_map))
    return values


def _metric(entry: Mapping[str, Any], metric: str) -> float:
    """A map with no positive mass (Grad-CAM's ReLU can leave none) scores nothing: its pixel
    order is all ties, which would insert or delete the whole image in the first frame."""
    if not math.isfinite(float(entry["own"])):
        return math.nan
    if metric == "own_minus_other":
        return float(entry["own"]) - float(entry["other"])
    if metric == "id":
        return float(entry["insertion"]) - float(entry["deletion"])
    return float(entry[metric])


def summarize_scenes(records: Sequence[dict[str, Any]], methods: Sequence[str] = SCENE_METHODS,
                     reference: str = "crp") -> dict[str, Any]:
    """Per method and metric: mean, SE and 95 % bootstrap CI over scenes; own − other paired per
    scene; every method minus ``reference`` paired over scenes."""
    summary: dict[str, Any] = {"scenes": len(records), "pairs": sum(bool(r.get("pair")) for r in records),
                               "methods": {}, "versus": {}}
    for method in methods:
        stats = {}
        for metric in SCENE_METRICS:
            values = scene_values(records, method, metric)
            mean, sem, low, high = mean_sem_ci(values)
            stats[metric] = {"mean": mean, "sem": sem, "lo": low, "hi": high,
                             "n": sum(math.isfinite(v) for v in values)}
        stats["empty_maps"] = sum(not math.isfinite(float(e["own"])) for r in records if r.get("pair")
                                  for e in r.get("methods", {}).get(method, []))
        stats["own_vs_other"] = paired_comparison(scene_values(records, method, "own"),
                                                  scene_values(records, method, "other"))
        summary["methods"][method] = stats
        if method != reference and reference in methods:
            summary["versus"][method] = {
                metric: paired_comparison(scene_values(records, method, metric),
                                          scene_values(records, reference, metric))
                for metric in ("own_minus_other", "pointing", "id")
            }
    return summary


def _ci(stats: Mapping[str, float]) -> str:
    return f"{stats['mean']:.3f} [{stats['lo']:.3f}, {stats['hi']:.3f}]"


def _diff(stats: Mapping[str, float]) -> str:
    return f"{stats['mean_diff']:+.3f} [{stats['lo']:+.3f}, {stats['hi']:+.3f}]"


def scenes_markdown(summary: Mapping[str, Any], command: str | None = None, reference: str = "crp") -> str:
    """The tables of docs/results.md's scene section."""
    lines = ["```", command, "```", ""] if command else []
    lines += [
        f"{summary['scenes']} scenes, {summary['pairs']} with two true positives of different classes "
        "(each explained for its own class); mean over scenes [95 % bootstrap CI]; n: scenes where "
        "both maps have positive mass (a map with none, an empty map, scores nothing):",
        "",
        "| method | n (empty maps) | energy in own box ↑ | energy in other box ↓ | own − other (paired) ↑ | pointing game ↑ "
        "| det. insertion ↑ | det. deletion ↓ | ins − del ↑ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, s in summary["methods"].items():
        lines.append(f"| {method} | {s['own_minus_other']['n']} ({s['empty_maps']}) | {_ci(s['own'])} | {_ci(s['other'])} "
                     f"| {_diff(s['own_vs_other'])} "
                     f"| {_ci(s['pointing'])} | {_ci(s['insertion'])} | {_ci(s['deletion'])} | {_ci(s['id'])} |")
    if summary["versus"]:
        lines += ["", f"Each method minus {reference}, paired over scenes [95 % CI] (Wilcoxon p):", "",
                  "| method | own − other | pointing game | ins − del |", "|---|---|---|---|"]
        for method, v in summary["versus"].items():
            cells = [f"{_diff(v[m])} (p {v[m]['wilcoxon_p']:.2g}, n {v[m]['n']})"
                     for m in ("own_minus_other", "pointing", "id")]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ driver


def evaluate_scenes(model: torch.nn.Module, classes: Sequence[str], config: SceneEvalConfig,
                    class_names: Sequence[str] = (), crp_options: Mapping[str, Any] | None = None,
                    warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate every method on the scenes; append to OUT/results.jsonl (resuming: scenes already
    there are kept, not redone), write summary.json and summary.md, return the summary."""
    methods = check_methods(config.methods)
    scenes = read_scenes(config.data, classes, class_names)[: config.limit or None]
    crp = CRP(model.eval(), **dict(crp_options or {}))
    warn = warn or (lambda line: tqdm.write(line, file=sys.stderr))  # its own line under the bar
    folder = config.out
    results = folder / "results.jsonl" if folder is not None else None
    done = _done(results, methods)
    records, skipped, started = [], 0, time.time()
    for scene in tqdm(scenes, desc="evaluate scenes", unit="scene", disable=not config.progress, file=sys.stderr):
        key = _key(scene.path, config.data)
        if key in done:
            records.append(done[key])
            continue
        try:
            record = evaluate_scene(crp, scene, load_tensor(scene.path), methods, config.step)
        except RelpropError as error:
            skipped += 1
            reason = str(error) if str(error).startswith(str(scene.path)) else f"{scene.path}: {error}"
            warn(f"relprop evaluate: skipped {reason}")
            if folder is not None:
                append_jsonl(folder / "skipped.jsonl", {"image": key, "reason": reason})
            continue
        record["image"] = key
        if results is not None:
            append_jsonl(results, record)
        records.append(record)
    summary = summarize_scenes(records, methods)
    summary.update(skipped=skipped, seconds=round(time.time() - started, 1), step=config.step)
    if folder is not None:
        write_atomic(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_atomic(folder / "summary.md", scenes_markdown(summary, config.command))
    return summary


def _key(path: Path, data: Path) -> str:
    return str(path.relative_to(data.parent)) if path.is_relative_to(data.parent) else str(path)


def _done(results: Path | None, methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Rows of an earlier run into the same OUT, by image; a row missing a requested method is redone."""
    if results is None or not results.is_file():
        return {}
    rows = {}
    for row in read_jsonl(results, repair=True):
        if not row.get("pair") or all(m in row.get("methods", {}) for m in methods):
            rows[str(row.get("image"))] = row
    return rows


__all__ = ["SCENE_METHODS", "Scene", "SceneEvalConfig", "SceneObject",
           "evaluate_scene", "evaluate_scenes", "explained_pair", "read_scenes", "scene_values",
           "scenes_markdown", "summarize_scenes"]
