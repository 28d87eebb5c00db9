"""The evaluation behind `relprop evaluate`: explain, score, append, summarize (resumable).

The library side only: `evaluate` takes a typed `EvalConfig` and the checkpoints already loaded
(the CLI parses the options, loads the models and prints the outcome).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relprop.defaults import MIN_FRAME_BATCH
from relprop.errors import ImageError, InputError, RelpropError
from relprop.evaluation.metrics import METRICS, PROTOCOLS, Channels
from relprop.evaluation.results import (
    append_jsonl,
    check_resume,
    read_jsonl,
    read_run_info,
    summarize,
    summary_markdown,
    write_run_info,
)


@dataclass(frozen=True)
class EvalConfig:
    """Everything `relprop evaluate` was asked for, checked when made (one clear line)."""

    data: Path
    out: Path
    methods: tuple[str, ...]
    protocols: tuple[str, ...] = ("paper",)
    channels: Channels = "sum"
    step: int | None = None
    block: int = 1
    limit: int | None = None
    per_class: int | None = None
    batch_size: int = 32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cam_layer: str | None = None
    save_maps: bool = False

    def __post_init__(self) -> None:
        for option, value in (("--step", self.step), ("--block", self.block), ("--limit", self.limit),
                              ("--per-class", self.per_class), ("--batch-size", self.batch_size)):
            if value is not None and value < 1:
                raise InputError(f"{option} {value}: must be at least 1")
        if Path(self.out).resolve().is_relative_to(Path(self.data).resolve()):
            raise InputError(f"--out {self.out} is inside --data {self.data}: its files would be "
                             "read as data; choose an --out outside the data folder")


@dataclass
class Plan:
    """What to compute: requested method names, the base methods they need, the protocols."""

    methods: list[str]
    bases: list[str]
    protocols: list[str]


@dataclass(frozen=True)
class Checkpoint:
    """One loaded model to evaluate: where it came from, its hash (results are keyed by it)."""

    path: str
    sha256: str
    model: torch.nn.Module
    meta: dict[str, Any]

    @classmethod
    def of(cls, model: torch.nn.Module, meta: dict[str, Any], given: str | None = None) -> Checkpoint:
        """A model and its meta as `relprop.models.load_model` returns them."""
        from relprop.models import file_sha256

        return cls(meta.get("weights") or str(given or meta["path"]), file_sha256(meta["path"]),
                   model, meta)


@dataclass
class EvalOutcome:
    """What a run did, for the caller to report: results, skipped images, failed methods."""

    out: Path
    results: int
    skipped: int
    failed_methods: list[str]


def evaluate(config: EvalConfig, checkpoints: Sequence[Checkpoint]) -> EvalOutcome:
    """Evaluate every method and protocol on every checkpoint's images, resuming where OUT holds
    results; write results.jsonl, run.json, summary.json, summary.md and the curves."""
    if not checkpoints:
        raise InputError("no checkpoint to evaluate")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = make_plan(config.methods, config.protocols)
    settings = _settings(config, plan, checkpoints)
    from relprop.methods import canonical_name

    check_resume(out / "run.json", settings, canonical_name)
    _record_labels(out / "run.json", checkpoints[0].meta)
    store = _Store(out, plan.methods)
    failed_methods: list[str] = []
    for checkpoint in checkpoints:
        failed_methods += _evaluate(checkpoint, config, plan, store, len(checkpoints) > 1)
    summary = summarize(store.records(), plan.methods, plan.protocols)
    _write_summary(out, summary, store.records(), plan)
    evaluated = {(sha, image) for sha, image, _, _ in store.done}
    skipped = len(store.skipped_keys() - evaluated)  # an image fixed since counts no more
    return EvalOutcome(out, len(store.done), skipped, list(dict.fromkeys(failed_methods)))


def make_plan(methods: Sequence[str], protocols: Sequence[str]) -> Plan:
    """The requested methods, spelled as requested (`ours` or `lrp-split`: aliases are equal
    names, so a method asked for twice under two spellings runs once) and the protocols; an
    unknown name is one line that lists the valid ones."""
    from relprop.methods import HQ_SUFFIX, requested_methods

    names = requested_methods(methods)
    for p in protocols:
        if p not in PROTOCOLS:
            raise InputError(f"unknown protocol {p!r}; choose from {', '.join(PROTOCOLS)}")
    if not protocols:
        raise InputError("--protocol is empty")
    bases = list(dict.fromkeys(n.removesuffix(HQ_SUFFIX) for n in names))
    return Plan(names, bases, list(dict.fromkeys(protocols)))


def _settings(config: EvalConfig, plan: Plan, checkpoints: Sequence[Checkpoint]) -> dict[str, Any]:
    """Everything that changes the numbers; a resumed run must match it exactly."""
    from relprop.evaluation.metrics import PAPER_STEP, RISE_BLUR_SIGMA, RISE_BLUR_SIZE

    return {
        "checkpoints": [{"path": c.path, "sha256": c.sha256} for c in checkpoints],
        "preprocessing": [{k: c.meta[k] for k in ("resize", "crop", "mean", "std")} for c in checkpoints],
        "data": str(Path(config.data).resolve()),
        "methods": plan.methods,
        "protocols": plan.protocols,
        "channels": config.channels,
        "step": {"paper": config.step or PAPER_STEP, "rise": config.step or "image width"},
        "block": config.block,
        "rise_blur": {"size": RISE_BLUR_SIZE, "sigma": RISE_BLUR_SIGMA},
        "limit": config.limit,
        "per_class": config.per_class,
        "cam_layer": config.cam_layer,
    }


def _record_labels(path: Path, meta: dict[str, Any]) -> None:
    """The model's class ids and names, by which the labels were given (the report shows them)."""
    run_info = read_run_info(path)
    run_info["labels"] = {"classes": list(meta["classes"]), "class_names": meta.get("class_names")}
    write_run_info(path, run_info)


class _Store:
    """results.jsonl and skipped.jsonl, appended line by line so a killed run loses nothing.

    Records written under another spelling of a requested method (`ours` in an older run that is
    now resumed as `lrp-split`, or the reverse) are read under this run's spelling, so they count
    as done and are summarized with the new ones.
    """

    def __init__(self, out: Path, methods: Sequence[str] = ()) -> None:
        from relprop.methods import canonical_name

        spelling = {canonical_name(name): name for name in methods}
        self.results_path, self.skipped_path = out / "results.jsonl", out / "skipped.jsonl"
        self._records = [{**r, "method": spelling.get(canonical_name(r["method"]), r["method"])}
                         for r in read_jsonl(self.results_path, repair=True)]
        self.done = {_key(r) for r in self._records}
        self._skipped = read_jsonl(self.skipped_path, repair=True)

    def records(self) -> list[dict[str, Any]]:
        return self._records

    def skipped_keys(self) -> set[tuple[str, str]]:
        return {(s["checkpoint_sha256"], s["image"]) for s in self._skipped}

    def add(self, record: dict[str, Any]) -> None:
        append_jsonl(self.results_path, record)
        self._records.append(record)
        self.done.add(_key(record))

    def skip(self, record: dict[str, str]) -> None:
        if (record["checkpoint_sha256"], record["image"]) in self.skipped_keys():
            return
        append_jsonl(self.skipped_path, record)
        self._skipped.append(record)


def _key(record: dict[str, Any]) -> tuple[str, str, str, str]:
    return record["checkpoint_sha256"], record["image"], record["method"], record["protocol"]


@dataclass
class _Batch:
    items: list[Any]
    inputs: torch.Tensor
    boxes: list[Any]


def _evaluate(checkpoint: Checkpoint, config: EvalConfig, plan: Plan, store: _Store,
              several: bool) -> list[str]:
    """All methods and protocols on one checkpoint's images, resuming where results exist.

    With --save-maps, images whose scores exist but whose maps do not get their maps written
    (the scores are not computed again). Returns the methods that could not run on this model.
    """
    from tqdm import tqdm

    from relprop.data import discover, select

    model, meta = checkpoint.model.to(config.device), checkpoint.meta
    dataset = discover(config.data, meta["classes"], meta.get("class_names"))
    if dataset.unknown:
        listed = ", ".join(f"{name} ({n})" for name, n in sorted(dataset.unknown.items()))
        print(f"relprop evaluate: left out {sum(dataset.unknown.values())} images of "
              f"{len(dataset.unknown)} classes the model does not have: {listed}", file=sys.stderr)
    items = select(dataset.items, config.per_class, config.limit)
    work = _Work(checkpoint, config, plan, store, _map_names(items), [], several)
    todo = [it for it in items if any(work.needs(it, name) for name in plan.methods)]
    methods = _build_methods(work, model, meta)
    progress = tqdm(total=len(todo) * len(plan.methods), desc=f"evaluate {Path(checkpoint.path).name}",
                    unit="map", dynamic_ncols=True)
    for batch, failures in _batches(dataset.root, todo, meta, config.batch_size):
        for item, message in failures:
            tqdm.write(f"relprop evaluate: skipping {item.path}: {message}", file=sys.stderr)
            store.skip({"checkpoint_sha256": checkpoint.sha256, "image": item.path, "error": message})
        progress.update(len(failures) * len(plan.methods))
        if batch is not None:
            _evaluate_batch(work, batch, methods, config.device, progress)
    progress.close()
    return work.failed


@dataclass
class _Work:
    """What one checkpoint's evaluation needs to decide, per image and method, what is left."""

    checkpoint: Checkpoint
    config: EvalConfig
    plan: Plan
    store: _Store
    stems: dict[str, str]
    failed: list[str]
    several: bool  # several checkpoints: their maps go to one folder each

    def pending(self, item: Any, name: str) -> list[str]:
        """Protocols not yet scored for (image, method)."""
        return [p for p in self.plan.protocols
                if (self.checkpoint.sha256, item.path, name, p) not in self.store.done]

    def map_file(self, item: Any, name: str) -> Path:
        folder = Path(self.config.out) / "maps"
        if self.several:
            folder = folder / Path(self.checkpoint.path).stem
        return folder / name / f"{self.stems[item.path]}.npy"

    def needs(self, item: Any, name: str) -> bool:
        return bool(self.pending(item, name)) or (self.config.save_maps and
                                                  not self.map_file(item, name).is_file())

    def fail(self, base: str, error: Exception) -> None:
        """Report a method that cannot run on this model; the other methods go on."""
        from tqdm import tqdm

        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = first if isinstance(error, RelpropError) else f"{type(error).__name__}: {first}"
        tqdm.write(f"relprop evaluate: error: method {base} cannot run on "
                   f"{Path(self.checkpoint.path).name}: {reason}; the other methods go on",
                   file=sys.stderr)
        self.failed += [n for n in self.plan.methods if n.removesuffix("+hq") == base]


def _build_methods(work: _Work, model: torch.nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    from relprop.methods import get_method

    methods = {}
    for base in work.plan.bases:
        try:
            methods[base] = get_method(base, model, batch_size=work.config.batch_size,
                                       mean=meta["mean"], std=meta["std"], layer=work.config.cam_layer)
        except Exception as error:  # any model a method cannot handle: report it, go on
            work.fail(base, error)
    return methods


def _batches(root: Path, items: Sequence[Any], meta: dict[str, Any],
             batch_size: int) -> Iterator[tuple[_Batch | None, list[tuple[Any, str]]]]:
    """Preprocessed batches of equal-sized inputs, with the images that could not be read."""
    from relprop.data import load_item
    from relprop.images import BoundedTransform
    from relprop.models import preprocessing

    transform = BoundedTransform(preprocessing(meta), meta["resize"])
    for start in range(0, len(items), batch_size):
        loaded, failures = [], []
        for item in items[start:start + batch_size]:
            try:
                loaded.append((item, *load_item(root, item, transform, meta)))
            except ImageError as error:
                failures.append((item, str(error)))
        if not loaded:
            yield None, failures
            continue
        for size in dict.fromkeys(tuple(x.shape) for _, x, _ in loaded):  # uncropped sizes may differ
            group = [row for row in loaded if tuple(row[1].shape) == size]
            yield _Batch([g[0] for g in group], torch.stack([g[1] for g in group]),
                         [g[2] for g in group]), failures
            failures = []


def _evaluate_batch(work: _Work, batch: _Batch, methods: dict[str, Any], device: torch.device,
                    progress: Any) -> None:
    """One image at a time, method by method, so that progress moves per (image, method)."""
    from relprop.methods import HQ_SUFFIX

    model = work.checkpoint.model
    x = batch.inputs.to(device)
    with torch.no_grad():
        preds = model(x).argmax(dim=1)
    for i, item in enumerate(batch.items):
        for base_name in list(methods):
            names = [n for n in work.plan.methods if n.removesuffix(HQ_SUFFIX) == base_name]
            if not any(work.needs(item, n) for n in names):
                progress.update(len(names))
                continue
            progress.set_postfix_str(f"{item.path} {base_name}", refresh=False)
            try:
                maps, sums = _attribute(methods[base_name], x[i:i + 1])
            except Exception as error:  # e.g. a CAM layer that does not fit: drop the method
                work.fail(base_name, error)
                del methods[base_name]
                progress.update(len(names))
                continue
            for name in names:
                _score_one(work, batch, i, x, preds[i], methods[base_name], name, maps, sums)
                progress.update(1)


def _score_one(work: _Work, batch: _Batch, i: int, x: torch.Tensor, pred: torch.Tensor, base: Any,
               name: str, maps: torch.Tensor, sums: dict[str, torch.Tensor] | None) -> None:
    """Save the map of one image (with --save-maps) and score the protocols still pending."""
    from relprop.evaluation.metrics import insertion_deletion, localization
    from relprop.methods import HQ_SUFFIX, HeatQuantized

    config, item, meta = work.config, batch.items[i], work.checkpoint.meta
    flat = (HeatQuantized(base, config.channels).quantize(maps)[:, 0] if name.endswith(HQ_SUFFIX)
            else base.to_2d(maps, config.channels))
    flat = flat.float().cpu()
    if config.save_maps:
        path = work.map_file(item, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, flat[0].numpy().astype(np.float32))
    pending = work.pending(item, name)
    if not pending:
        return
    boxes = localization(flat, batch.boxes[i:i + 1])
    labels = torch.tensor([item.label], device=x.device)
    for protocol in pending:
        result = insertion_deletion(work.checkpoint.model, x[i:i + 1], flat, labels, protocol,
                                    mean=meta["mean"], std=meta["std"], step=config.step,
                                    block=config.block,
                                    batch_size=max(config.batch_size, MIN_FRAME_BATCH))
        work.store.add(_record(work.checkpoint, item, name, protocol, config.channels, base, pred,
                               result, 0, boxes[0], sums))


def _attribute(method: Any, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Maps of the predicted class; relprop LRP methods also give their conservation report."""
    if method.is_lrp:
        return method.attribute(x, return_layer_sums=True)
    return method.attribute(x), None


def _record(checkpoint: Checkpoint, item: Any, method: str, protocol: str, channels: str, base: Any,
            pred: torch.Tensor, result: Any, i: int, box_scores: dict[str, Any] | None,
            sums: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    return {
        "checkpoint": checkpoint.path,
        "checkpoint_sha256": checkpoint.sha256,
        "image": item.path,
        "label": int(item.label),
        "pred": int(pred),
        "method": method,
        "protocol": protocol,
        "channels": "sum" if base.is_lrp else channels,
        **{key: metric.score(result, i) for key, metric in METRICS.items()},
        "insertion_curve": [float(v) for v in result.insertion_curves[i]],
        "deletion_curve": [float(v) for v in result.deletion_curves[i]],
        "localization": box_scores,
        "conservation": _conservation(sums, i),
    }


def _conservation(sums: dict[str, torch.Tensor] | None, i: int) -> dict[str, Any] | None:
    """Relevance totals at the output, the last and the first residual block, and the input."""
    if sums is None:
        return None
    blocks = [k for k in sums if "." in k]  # residual blocks, e.g. "layer4.1", output to input
    report: dict[str, Any] = {"output": float(sums["output"][i]), "input": float(sums["input"][i])}
    if blocks:
        report.update({"last_block": float(sums[blocks[0]][i]), "last_block_name": blocks[0],
                       "first_block": float(sums[blocks[-1]][i]), "first_block_name": blocks[-1]})
    report["input_over_output"] = report["input"] / report["output"] if report["output"] else None
    return report


def _map_names(items: Sequence[Any]) -> dict[str, str]:
    """Image stems name the saved maps; where stems collide, the relative path stands in."""
    stems = [Path(it.path).stem for it in items]
    unique = len(set(stems)) == len(stems)
    return {it.path: (Path(it.path).stem if unique else str(Path(it.path).with_suffix("")).replace("/", "__"))
            for it in items}


def _write_summary(out: Path, summary: dict[str, Any], records: Sequence[dict[str, Any]],
                   plan: Plan) -> None:
    from relprop.evaluation.results import mean_curves
    from relprop.viz import plot_curves

    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary, plan.protocols))
    curves = mean_curves(records)
    for protocol in plan.protocols:
        if protocol in curves:
            aucs = {m: {k: s["protocols"][protocol][k] for k in ("insertion", "deletion")}
                    for m, s in summary.items() if protocol in s["protocols"]}
            plot_curves(curves[protocol], aucs, protocol, out / f"curves_{protocol}.png")



