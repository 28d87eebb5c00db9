"""Heatmaps of a classifier for image files: the pipeline behind `relprop explain`.

`explain_images(config, model, info)` loads the images in batches, runs every method, and writes
under `config.out`, for each image, `original.png`, `METHOD.png` (the map over the image),
`METHOD.npy` (the map as float32 (H, W)) and `panel.png`; for the run `predictions.jsonl`,
`overview.png` (several images) and `manifest.json`. An unreadable image, or a method that cannot
run on the model, is named on stderr and the others go on; the summary lists both.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from relprop.errors import ImageError, RelpropError, TargetError, first_line
from relprop.images import BoundedTransform, load_image
from relprop.methods import get_method
from relprop.modelinfo import ModelInfo
from relprop.models import class_names_of, preprocessing
from relprop.pipelines.inputs import Job, plan_jobs
from relprop.pipelines.outputs import Manifest, writing
from relprop.targets import as_index, show_option
from relprop.viz import PanelRow, denormalize, heat_2d, save_overlay, save_panel, save_png

DEFAULT_METHODS = ("ours", "gradcam", "ig")
OVERVIEW_ROWS = 8
SIGNS = ("all", "positive")


@dataclass(frozen=True)
class ExplainConfig:
    """What `relprop explain` was asked for, checked when made (one clear line)."""

    inputs: tuple[str, ...]
    out: Path
    methods: tuple[str, ...] = DEFAULT_METHODS
    target: str | None = None  # an index, a class id or a class name; None: the predicted class
    hq: bool = False
    sign: str = "all"
    batch_size: int = 8
    device: Any = "cpu"
    cam_layer: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise RelpropError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.sign not in SIGNS:
            raise RelpropError(f"--sign {self.sign!r}: choose one of {', '.join(SIGNS)}")


@dataclass(frozen=True)
class ExplainRecord:
    """One image explained: a line of predictions.jsonl."""

    image: str
    output: str  # its folder under OUT
    pred: int
    pred_name: str
    prob: float
    target: int
    target_name: str
    target_prob: float
    methods: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "output": self.output, "pred": self.pred,
                "pred_name": self.pred_name, "prob": self.prob, "target": self.target,
                "target_name": self.target_name, "target_prob": self.target_prob,
                "methods": list(self.methods)}


@dataclass
class ExplainSummary:
    """What a run did: the images explained, the inputs and methods that failed, stale files removed."""

    out: Path
    records: list[ExplainRecord] = field(default_factory=list)
    inputs: int = 0  # images found plus inputs that failed before (empty folders)
    failures: list[str] = field(default_factory=list)  # one line per failed input
    failed_methods: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # files of the previous run, removed
    capture_path: str | None = None  # how LRP made the model a graph: "fx" or "concrete" (per shape)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.failed_methods


def explain_images(config: ExplainConfig, model: Any, info: ModelInfo,
                   on_image: Callable[[ExplainRecord], None] | None = None) -> ExplainSummary:
    """Explain every image of `config.inputs` with every method; `on_image` is told of each image
    as soon as its files are written (the CLI prints a line)."""
    out = Path(config.out)
    model.to(config.device)
    target = parse_target(config.target, info)
    summary = ExplainSummary(out)
    explainers = build_methods(config.methods, model, info, config.hq, config.cam_layer,
                               summary.failed_methods)
    jobs, summary.failures = plan_jobs(config.inputs, "explain", exclude=out)
    summary.inputs = len(jobs) + len(summary.failures)  # an empty folder counts as one failed input
    transform = BoundedTransform(preprocessing(info), info.preprocessing.resize)
    context = _Context(model, info, transform, explainers, class_names_of(info), target,
                       config.device, config.sign, out, Manifest(out, "explain"),
                       summary.failed_methods, summary.failures)
    with writing(out):
        overview = _explain_all(context, jobs, config.batch_size, summary, on_image)
        if len(overview) > 1:
            save_panel(context.manifest.add(out / "overview.png"), overview, sign=config.sign)
        summary.removed = context.manifest.finish()
    summary.capture_path = next((path for path in map(_capture_path, explainers.values()) if path), None)
    return summary


def _capture_path(method: Any) -> str | None:
    """`LRP.capture_path` of an LRP method (or of the one a +hq wrapper holds)."""
    lrp = getattr(method, "lrp", None) or getattr(getattr(method, "base", None), "lrp", None)
    return getattr(lrp, "capture_path", None)


def parse_target(text: str | None, info: ModelInfo) -> int | None:
    """`--target` as an index, a class id (e.g. a wnid) or a class name, case-insensitively."""
    if text is None:
        return None
    count = info.num_classes
    index = as_index(text)
    if index is not None:
        if not 0 <= index < count:
            raise TargetError(f"--target {index}: the model has classes 0..{count - 1}")
        return index
    for known in (info.classes, info.class_names):
        labels = [str(label).lower() for label in known or []]
        if text.strip().lower() in labels:
            return labels.index(text.strip().lower())
    raise TargetError(f"--target {show_option(text)}: not a class index, id or name of this model")


def build_methods(names: Sequence[str], model: Any, info: ModelInfo, hq: bool,
                  cam_layer: str | None = None, failures: list[str] | None = None) -> dict[str, Any]:
    """One explainer per name, from the registry, with the model's normalization.

    `--hq` quantizes the LRP methods' maps, as the paper does: on a signed baseline map the
    level holding zero starts below zero, which would tint the whole background. A method that
    cannot be built for this model is reported and left out (into `failures`); with no method
    left, the run stops.
    """
    def make(name: str) -> Any:
        return get_method(name, model, mean=info.mean, std=info.std, layer=cam_layer)

    methods = {}
    failures = [] if failures is None else failures
    for name in names:
        try:
            method = make(name)
            if hq and method.is_lrp and not name.endswith("+hq"):
                name = f"{name}+hq"
                method = make(name)
        except Exception as error:  # any model a method cannot handle: report it, go on
            if isinstance(error, RelpropError) and "--cam-layer" in str(error):
                raise  # the user's --cam-layer is wrong for every CAM method: stop here
            _method_failed(failures, name, error)
            continue
        methods[name] = method
    if not methods:
        raise RelpropError(f"none of the methods {', '.join(names)} can run on this model")
    return methods


def _method_failed(failures: list[str], name: str, error: Exception) -> None:
    """One line for a method that cannot run on this model; the run goes on without it."""
    first = first_line(error, default="")
    reason = first if isinstance(error, RelpropError) else f"{type(error).__name__}: {first}"
    tqdm.write(f"relprop explain: error: method {name} cannot run on this model: {reason}; "
               "the other methods go on", file=sys.stderr)
    failures.append(name)


@dataclass
class _Context:
    """What every batch needs: the model, its preprocessing and explainers, where to write."""

    model: Any
    info: ModelInfo
    transform: Any
    explainers: dict[str, Any]
    names: list[str]
    target: int | None
    device: Any
    sign: str
    out: Path
    manifest: Manifest
    method_failures: list[str]
    failures: list[str]  # one line per input that failed (the summary's)

    def image_failed(self, line: str) -> None:
        """Name a failed image on stderr and in the summary; the others go on."""
        self.failures.append(line)
        tqdm.write(f"relprop explain: error: {line}", file=sys.stderr)


def _explain_all(context: _Context, jobs: Sequence[Job], batch_size: int, summary: ExplainSummary,
                 on_image: Callable[[ExplainRecord], None] | None) -> list[Any]:
    """Batch by batch, with a progress bar; unreadable images are named and skipped.

    Returns the panel rows of the first images for the overview.
    """
    overview: list[Any] = []
    log_path = context.manifest.add(context.out / "predictions.jsonl")
    with open(log_path, "w", encoding="utf-8") as log, \
            tqdm(total=len(jobs), unit="image", desc="explain", file=sys.stderr,
                 disable=None) as bar:
        for batch in _batched(jobs, batch_size):
            loaded = []
            for job in batch:
                try:
                    loaded.append((job, _load(job, context.transform)))
                except ImageError as error:
                    context.image_failed(str(error))
            for record, row in _explain_batch(context, loaded):
                log.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
                summary.records.append(record)
                if on_image is not None:
                    on_image(record)
                if len(overview) < OVERVIEW_ROWS:
                    overview.append(row)
            bar.update(len(batch))
    return overview


def _load(job: Job, transform: Any) -> Any:
    """The model input of one image; a refused size names the file like a refused file."""
    image = load_image(job.path)
    try:
        return transform(image)
    except ImageError as error:
        raise ImageError(f"{job.path}: {error}") from None


def _explain_batch(context: _Context,
                   loaded: Sequence[tuple[Job, Any]]) -> Iterator[tuple[ExplainRecord, Any]]:
    """Predict, explain with every method, write each image's files; yield (record, panel row).

    Without a crop, photos of different aspect ratios give inputs of different sizes: each
    size is run as its own sub-batch.
    """
    for group in _same_shape_groups(loaded):
        yield from _explain_group(context, group)


def _same_shape_groups(loaded: Sequence[tuple[Job, Any]]) -> Iterator[list[tuple[Job, Any]]]:
    groups: dict[tuple[int, ...], list[tuple[Job, Any]]] = {}
    for job, tensor in loaded:
        groups.setdefault(tuple(tensor.shape), []).append((job, tensor))
    yield from groups.values()


def _explain_group(context: _Context,
                   group: Sequence[tuple[Job, Any]]) -> Iterator[tuple[ExplainRecord, Any]]:
    x = torch.stack([tensor for _, tensor in group]).to(context.device)
    with torch.no_grad():
        logits = context.model(x).float()
    finite = torch.isfinite(logits).all(dim=1).cpu()
    for (job, _), ok in zip(group, finite.tolist(), strict=True):
        if not ok:  # NaN is an error, never a number: no "goldfish (nan%)" over an empty map
            context.image_failed(f"{job.path}: the model's output is NaN or infinite for this image "
                                 "(check the weights); not explained")
    if not bool(finite.all()):
        group = [entry for entry, ok in zip(group, finite.tolist(), strict=True) if ok]
        if not group:
            return
        x, logits = x[finite.to(x.device)], logits[finite.to(logits.device)]
    probs = torch.softmax(logits, dim=1).cpu()
    maps = {}
    for name, method in list(context.explainers.items()):
        try:
            maps[name] = _as_numpy(method.attribute(x, target=context.target))
        except Exception as error:  # e.g. a CAM layer that does not fit: drop the method
            _method_failed(context.method_failures, name, error)
            del context.explainers[name]
    if not context.explainers:
        raise RelpropError("no method could run on this model (named above)")
    for i, (job, _) in enumerate(group):
        bad = [name for name, m in maps.items() if not np.isfinite(m[i]).all()]
        if bad:
            context.image_failed(f"{job.path}: method {bad[0]} gave NaN or infinite relevance; "
                                 "not explained")
            continue
        yield _write_image_outputs(context, job, x[i].cpu().numpy(), probs[i],
                                   {name: m[i] for name, m in maps.items()})


def _as_numpy(maps: Any) -> Any:
    return maps.detach().float().cpu().numpy()


def _write_image_outputs(context: _Context, job: Job, x: Any, probs: Any,
                         maps: dict[str, Any]) -> tuple[ExplainRecord, Any]:
    """Overlays, raw maps, original and panel for one image, plus its predictions.jsonl record."""
    folder = context.out / job.name
    folder.mkdir(parents=True, exist_ok=True)
    add = context.manifest.add
    image = denormalize(x, context.info.mean, context.info.std)
    save_png(add(folder / "original.png"), image)
    pred = int(probs.argmax())
    explained = pred if context.target is None else context.target
    heats = {}
    for name, relevance in maps.items():
        heats[name] = heat_2d(relevance)
        np.save(add(folder / f"{name}.npy"), heats[name])
        save_overlay(add(folder / f"{name}.png"), image, heats[name],
                     title=f"{name} · {context.names[explained]}", sign=context.sign)
    caption = f"{job.path.name}\n{context.names[pred]} {float(probs[pred]):.0%}"
    if explained != pred:
        caption += f"\nexplained: {context.names[explained]}"
    row = PanelRow(image, caption, heats)
    save_panel(add(folder / "panel.png"), [row], sign=context.sign)
    record = ExplainRecord(
        image=str(job.path), output=job.name, pred=pred, pred_name=context.names[pred],
        prob=round(float(probs[pred]), 6), target=explained,
        target_name=context.names[explained], target_prob=round(float(probs[explained]), 6),
        methods=list(maps),
    )
    return record, row


def _batched(items: Sequence[Job], size: int) -> Iterator[Sequence[Job]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
