"""The evaluation behind `relprop evaluate`: explain, score, append, summarize (resumable).

The library side only: `evaluate` takes a typed `EvalConfig` and the checkpoints already loaded
(the CLI parses the options, loads the models and prints the outcome).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from relprop.data import discover, load_item, select
from relprop.defaults import MIN_FRAME_BATCH
from relprop.errors import DiskFullError, ImageError, InputError, RelpropError, first_line
from relprop.evaluation import metrics
from relprop.evaluation.compare import compare_markdown, paired_differences
from relprop.evaluation.distributed import Group, Ranks
from relprop.evaluation.metrics import (
    METRICS,
    PAPER_STEP,
    PROTOCOLS,
    RISE_BLUR_SIGMA,
    RISE_BLUR_SIZE,
    localization,
)
from relprop.evaluation.protocols import DEFAULT_SEED, DEFAULT_TIES, TIES
from relprop.evaluation.results import (
    DISK_FULL,
    Conservation,
    ReadCounts,
    ResultRow,
    RunLock,
    RunRows,
    append_jsonl,
    check_resume,
    iter_rows,
    load_rows,
    map_is_whole,
    rank_file,
    read_run_info,
    read_union,
    remove_temporaries,
    row_variant,
    save_map,
    shard_files,
    skipped_key,
    statistics_markdown,
    summarize,
    summary_markdown,
    write_atomic,
    write_run_info,
    writing,
)
from relprop.evaluation.road import NEIGHBOURS, ROAD_NOISE, ROAD_PERCENTAGES
from relprop.heatmaps import Channels
from relprop.images import BoundedTransform
from relprop.methods import HQ_SUFFIX, HeatQuantized, canonical_name, get_method, requested_methods
from relprop.modelinfo import PREPROCESSING_KEYS, ModelInfo
from relprop.models import preprocessing
from relprop.viz import plot_curves


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
    baseline: str | None = None  # summary.md: paired comparisons of every method against it
    extend: bool = False  # a resume may change --data/--limit/--per-class: the run takes the new images
    ties: str = DEFAULT_TIES  # how tied pixels are ordered (protocols.TIES)
    seed: int = DEFAULT_SEED  # random ties and ROAD's noise, drawn per (seed, image path)

    def __post_init__(self) -> None:
        if self.ties not in TIES:
            raise InputError(f"--ties {self.ties}: choose from {', '.join(TIES)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"--seed {self.seed}: must be an integer >= 0")
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
    info: ModelInfo

    @classmethod
    def of(cls, model: torch.nn.Module, info: ModelInfo, given: str | None = None) -> Checkpoint:
        """A model and its `ModelInfo` as `relprop.models.load_model` returns them."""
        if info.source is None:
            raise InputError(f"{info.arch}: a checkpoint to evaluate needs the file of its weights")
        return cls(info.source.name or str(given or info.source.path), info.source.sha256,
                   model, info)


@dataclass
class EvalOutcome:
    """What a run did, for the caller to report: results, skipped images, failed methods."""

    out: Path
    results: int
    skipped: int
    failed_methods: list[str]
    primary: bool = True  # False on ranks other than 0 of a sharded run (rank 0 reports)
    failed_rows: int = 0  # (image, method, protocol) with a NaN/Inf output, map or score


def evaluate(config: EvalConfig, checkpoints: Sequence[Checkpoint]) -> EvalOutcome:
    """Evaluate every method and protocol on every checkpoint's images, resuming where OUT holds
    results; write the results, run.json, summary.json, summary.md and the curves.

    Under torchrun (RANK/WORLD_SIZE set) each process takes its share of the images, appends to
    its own results.rank{r}.jsonl, and rank 0 writes the summary of the union at the end.
    """
    if not checkpoints:
        raise InputError("no checkpoint to evaluate")
    ranks = Ranks.from_env()
    device = ranks.device(config.device)
    group = Group(ranks, device)
    try:
        return _evaluate_all(config, checkpoints, ranks, group, device)
    except OSError as error:  # a write no helper wrapped (a figure, a folder): still one line
        if error.errno not in DISK_FULL:
            raise
        raise DiskFullError(f"no space left on device writing {error.filename or config.out}; "
                            "free space and rerun the same command to resume") from None
    finally:
        group.close()


def _evaluate_all(config: EvalConfig, checkpoints: Sequence[Checkpoint], ranks: Any, group: Any,
                  device: torch.device) -> EvalOutcome:
    out = Path(config.out)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    plan = make_plan(config.methods, config.protocols)
    if config.baseline is not None and canonical_name(config.baseline) not in {
            canonical_name(m) for m in plan.methods}:
        raise InputError(f"--baseline {config.baseline}: not among --methods "
                         f"({', '.join(plan.methods)}); add it there or choose one of them")
    selections = [_select(checkpoint, config, ranks.rank == 0) for checkpoint in checkpoints]
    stamps = {path: stamp for _, found in selections for path, stamp in found.items()}
    refusal, lock = None, None
    if ranks.rank == 0:  # one writer of run.json, holding the folder's lock for every rank
        try:
            lock = RunLock(out)
            remove_temporaries(out)  # of writers killed before: none is alive, we hold the lock
            check_resume(out / "run.json", _settings(config, plan, checkpoints), canonical_name,
                         stamps, config.extend)
            _record_labels(out / "run.json", checkpoints[0].info)
        except RelpropError as error:
            refusal = error
    try:
        verdict = group.gather(None if refusal is None else str(refusal))[0]
        if refusal is not None:
            raise refusal
        if verdict is not None:
            raise InputError(verdict)
        return _evaluate_locked(config, checkpoints, ranks, group, device, plan, selections, stamps)
    finally:
        if lock is not None:
            lock.release()


def _evaluate_locked(config: EvalConfig, checkpoints: Sequence[Checkpoint], ranks: Any, group: Any,
                     device: torch.device, plan: Plan, selections: list[tuple[Any, dict[str, str]]],
                     stamps: dict[str, str]) -> EvalOutcome:
    out = Path(config.out)
    store = _Store(out, plan.methods, ranks, stamps)
    jobs = [_job(checkpoint, config, plan, store, len(checkpoints) > 1, selection)
            for checkpoint, selection in zip(checkpoints, selections, strict=True)]
    group.gather(None)  # every rank has read what is done before any rank writes
    progress = _Progress(out, ranks, sum(job.remaining() for job in jobs), len(plan.methods),
                         len(plan.protocols))
    failed_methods: list[str] = []
    try:
        for job in jobs:
            failed_methods += _evaluate(job, ranks, device, progress)
    except BaseException as error:
        _report_failure(ranks, store, jobs, error)
        progress.close()
        raise
    outcomes = group.gather(failed_methods)
    progress.close()  # after every rank is done, so the bar ends at the job's total
    failed_methods = [name for found in outcomes for name in found]
    if ranks.rank != 0:
        return EvalOutcome(out, 0, 0, list(dict.fromkeys(failed_methods)), primary=False)
    run = store.load()
    summary = summarize(run.rows, plan.methods, plan.protocols)
    _write_summary(out, summary, run, plan, config.baseline)
    for note in run.counts.notes():
        print(f"relprop evaluate: {note}", file=sys.stderr)
    evaluated = {(sha, image) for sha, image, *_ in store.done}
    skipped = len(store.skipped_keys() - evaluated)  # an image fixed since counts no more
    return EvalOutcome(out, len(store.done), skipped, list(dict.fromkeys(failed_methods)),
                       failed_rows=run.counts.failed)


def _report_failure(ranks: Any, store: _Store, jobs: Sequence[_Work], error: BaseException) -> None:
    """Say which rank failed, on what, and how to resume (its finished rows are on disk)."""
    if ranks.world == 1 or isinstance(error, KeyboardInterrupt):
        return
    current = next((job.current for job in jobs if job.current), "before its first image")
    print(f"relprop evaluate: rank {ranks.rank} of {ranks.world} failed on {current} "
          f"({type(error).__name__}: {first_line(error, default='')}); "
          f"its finished rows are in {store.results_path}: rerun the same command (any "
          "--nproc-per-node) to resume", file=sys.stderr)


def make_plan(methods: Sequence[str], protocols: Sequence[str]) -> Plan:
    """The requested methods, spelled as requested (`ours` or `lrp-split`: aliases are equal
    names, so a method asked for twice under two spellings runs once) and the protocols; an
    unknown name is one line that lists the valid ones."""
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
    return {
        "checkpoints": [{"path": c.path, "sha256": c.sha256} for c in checkpoints],
        "preprocessing": [{k: v for k, v in c.info.preprocessing.to_dict().items()
                           if k in PREPROCESSING_KEYS} for c in checkpoints],
        "data": str(Path(config.data).resolve()),
        "methods": plan.methods,
        "protocols": plan.protocols,
        "channels": config.channels,
        "step": {"paper": config.step or PAPER_STEP, "rise": config.step or "image width"},
        "block": config.block,
        "rise_blur": {"size": RISE_BLUR_SIZE, "sigma": RISE_BLUR_SIGMA},
        "ties": config.ties,
        "seed": config.seed,
        **({"road": {"percentages": list(ROAD_PERCENTAGES), "noise": ROAD_NOISE,
                     "neighbours": [list(n) for n in NEIGHBOURS]}} if "road" in plan.protocols else {}),
        "limit": config.limit,
        "per_class": config.per_class,
        "cam_layer": config.cam_layer,
    }


def _record_labels(path: Path, info: ModelInfo) -> None:
    """The model's class ids and names, by which the labels were given (the report shows them)."""
    run_info = read_run_info(path)
    run_info["labels"] = {"classes": list(info.classes), "class_names": info.class_names}
    write_run_info(path, run_info)


class _Store:
    """This process's results and skipped files (appended line by line, so a killed run loses
    only the row in progress) and the keys of every process's rows, streamed once at the start.

    Records written under another spelling of a requested method (`ours` in an older run that is
    now resumed as `lrp-split`, or the reverse) are read under this run's spelling, so they count
    as done and are summarized with the new ones. Rows of images that are not in the run's inputs
    as they are now (removed, or replaced since) do not count.
    """

    def __init__(self, out: Path, methods: Sequence[str] = (), ranks: Any = None,
                 inputs: dict[str, str] | None = None) -> None:
        self.out, self._spelling = out, {canonical_name(name): name for name in methods}
        self.inputs = inputs
        rank, world = (ranks.rank, ranks.world) if ranks is not None else (0, 1)
        self.results_path = rank_file(out, "results", rank, world)
        self.skipped_path = rank_file(out, "skipped", rank, world)
        self.reload()

    def spelled(self, method: str) -> str:
        return self._spelling.get(canonical_name(method), method)

    def reload(self) -> None:
        """Stream the keys of all processes' rows (each process cuts back its own torn last line);
        keep only the keys (and those of failed rows, whose maps are not saved)."""
        self.done: set[tuple[str, str, str, str, str]] = set()
        self.failed: set[tuple[str, str, str]] = set()
        for row in iter_rows(self.out, repair=self.results_path, canonical=canonical_name,
                             inputs=self.inputs):
            sha, image, method = (sys.intern(row.checkpoint_sha256), sys.intern(row.image),
                                  sys.intern(self.spelled(row.method)))
            self.done.add((sha, image, method, sys.intern(row.protocol), sys.intern(row.variant)))
            if row.failure:
                self.failed.add((sha, image, method))
        self._skipped = read_union(self.out, "skipped", skipped_key, repair=self.skipped_path)
        self._skipped_keys = {skipped_key(s) for s in self._skipped}

    def load(self) -> RunRows:
        """Every process's scored rows, streamed (curves summed, not kept), in this run's spelling."""
        return load_rows(self.out, canonical=canonical_name, inputs=self.inputs, counts=ReadCounts(),
                         rename=self.spelled)

    def skipped_keys(self) -> set[tuple[str, str]]:
        return set(self._skipped_keys)

    def add(self, row: ResultRow) -> None:
        append_jsonl(self.results_path, row.to_dict())
        self.done.add(row.key)
        if row.failure:
            self.failed.add(row.key[:3])

    def skip(self, record: dict[str, str]) -> None:
        key = skipped_key(record)
        if key in self._skipped_keys:
            return
        append_jsonl(self.skipped_path, record)
        self._skipped.append(record)
        self._skipped_keys.add(key)


class _Progress:
    """One bar for the whole job on rank 0, counting (image, method) maps scored in every protocol,
    with its rate and ETA and the images per second beside them. Other ranks' rows are counted
    from their files (a thread reads the new bytes each second); no messages are sent."""

    def __init__(self, out: Path, ranks: Any, rows: int, methods: int, protocols: int) -> None:
        self.out, self.ranks, self._stop = out, ranks, None
        self.bar, self.rows, self.protocols, self.methods = None, 0, protocols, methods
        self.total_rows, self.started, self._note = rows, time.monotonic(), ""
        if ranks.rank != 0:
            return
        # smoothing=0: the rate is maps done / time since the start, read when the bar is drawn.
        # Rows come in bursts (a batch's scores at once): a moving average over bursts, or a bar
        # drawn at the first row of a burst only, showed hours of ETA for a minutes-long run:
        # `note` redraws it when the work moves on, after each burst.
        self.bar = tqdm(total=math.ceil(rows / protocols), desc="evaluate", unit="map",
                        dynamic_ncols=True, smoothing=0, miniters=1)
        if ranks.world > 1:
            self._offsets = {p: p.stat().st_size for p in shard_files(out, "results")}
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def update(self, rows: int) -> None:
        """Rows done (or found done) by this process; sharded runs count from the files."""
        if self.bar is not None and self._stop is None:
            self._advance(rows)

    def _advance(self, rows: int) -> None:
        assert self.bar is not None
        self.rows = min(self.rows + rows, self.total_rows)
        maps = self.rows // self.protocols if self.rows < self.total_rows else self.bar.total
        self._postfix()
        if maps > self.bar.n:
            self.bar.update(maps - self.bar.n)

    def note(self, text: str) -> None:
        """What rank 0 computes now, after the images per second; redraws the bar, so that the
        count and ETA shown are those at the end of the last burst of rows."""
        self._note = text
        self._postfix()
        if self.bar is not None:
            self.bar.refresh()

    def _postfix(self) -> None:
        if self.bar is None:
            return
        elapsed = time.monotonic() - self.started
        rate = (f"{self.rows / (self.protocols * self.methods) / elapsed:.3g} img/s, "
                if elapsed > 0 and self.rows else "")
        self.bar.set_postfix_str(rate + self._note, refresh=False)

    def _poll(self) -> None:
        assert self._stop is not None and self.bar is not None
        while not self._stop.wait(1.0):
            self._poll_once()

    def _poll_once(self) -> None:
        """Count the whole lines appended to any results file since the last look."""
        assert self.bar is not None
        new = 0
        for path in shard_files(self.out, "results"):
            start = self._offsets.get(path, 0)
            with open(path, "rb") as handle:
                handle.seek(start)
                chunk = handle.read()
            cut = chunk.rfind(b"\n") + 1  # whole lines only
            new += chunk[:cut].count(b"\n")
            self._offsets[path] = start + cut
        if new:
            self._advance(new)

    def close(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._stop.clear()
            self._poll_once()
        if self.bar is not None:
            self.bar.close()


@dataclass
class _Batch:
    items: list[Any]
    inputs: torch.Tensor
    boxes: list[Any]


@dataclass
class _Work:
    """One checkpoint's share of the job: its images in fixed batches, and what is left of them."""

    checkpoint: Checkpoint
    config: EvalConfig
    plan: Plan
    store: _Store
    stems: dict[str, str]
    failed: list[str]
    several: bool  # several checkpoints: their maps go to one folder each
    root: Path = Path()
    batches: list[list[Any]] = field(default_factory=list)  # the whole job's, in order
    current: str = ""  # the image being computed (named if the process fails)
    span: str = ""  # the batch being computed, for the progress bar: "images 33-64 of 250"
    order: dict[str, int] = field(default_factory=dict)  # image -> its place in the sorted images
    broken: dict[int, str] = field(default_factory=dict)  # this batch's images with NaN/Inf logits
    stamps: dict[str, str] = field(default_factory=dict)  # image -> size:mtime, kept in its rows
    whole_maps: dict[Path, bool] = field(default_factory=dict)  # map files found complete

    def pending(self, item: Any, name: str) -> list[str]:
        """Protocols not yet scored for (image, method)."""
        ties, seed = self.config.ties, self.config.seed
        return [p for p in self.plan.protocols
                if (self.checkpoint.sha256, item.path, name, p, row_variant(p, ties, seed))
                not in self.store.done]

    def map_file(self, item: Any, name: str) -> Path:
        folder = Path(self.config.out) / "maps"
        if self.several:
            folder = folder / Path(self.checkpoint.path).stem
        return folder / name / f"{self.stems[item.path]}.npy"

    def needs(self, item: Any, name: str) -> bool:
        return bool(self.pending(item, name)) or self.needs_map(item, name)

    def needs_map(self, item: Any, name: str) -> bool:
        """--save-maps and no complete map file (a cut or empty one is written again); none for
        a failed (non-finite) map."""
        if not self.config.save_maps or (self.checkpoint.sha256, item.path, name) in self.store.failed:
            return False
        path = self.map_file(item, name)
        if path not in self.whole_maps:
            self.whole_maps[path] = map_is_whole(path)
        return not self.whole_maps[path]

    def remaining(self) -> int:
        """Rows still to score in the whole job (all ranks), for the progress bar."""
        return sum(len(self.pending(item, name)) for batch in self.batches for item in batch
                   for name in self.plan.methods)

    def fail(self, base: str, error: Exception) -> None:
        """Report a method that cannot run on this model; the other methods go on."""
        first = first_line(error, default="")
        reason = first if isinstance(error, RelpropError) else f"{type(error).__name__}: {first}"
        tqdm.write(f"relprop evaluate: error: method {base} cannot run on "
                   f"{Path(self.checkpoint.path).name}: {reason}; the other methods go on",
                   file=sys.stderr)
        self.failed += [n for n in self.plan.methods if n.removesuffix("+hq") == base]


def _select(checkpoint: Checkpoint, config: EvalConfig, primary: bool = True,
            ) -> tuple[Any, dict[str, str]]:
    """The checkpoint's dataset and its selected images' stamps (size:mtime in ns): what the run
    records in run.json, so that a resume on changed images is noticed."""
    info = checkpoint.info
    dataset = discover(config.data, info.classes, info.class_names)
    if dataset.unknown and primary:
        listed = ", ".join(f"{name} ({n})" for name, n in sorted(dataset.unknown.items()))
        print(f"relprop evaluate: left out {sum(dataset.unknown.values())} images of "
              f"{len(dataset.unknown)} classes the model does not have: {listed}", file=sys.stderr)
    items = sorted(select(dataset.items, config.per_class, config.limit), key=lambda it: it.path)
    return (dataset, items), {item.path: _stamp(dataset.root / item.path) for item in items}


def _stamp(path: Path) -> str:
    try:
        found = os.stat(path)
    except OSError:
        return "missing"
    return f"{found.st_size}:{found.st_mtime_ns}"


def _job(checkpoint: Checkpoint, config: EvalConfig, plan: Plan, store: _Store,
         several: bool, selection: tuple[tuple[Any, list[Any]], dict[str, str]]) -> _Work:
    """The checkpoint's images, selected, sorted by path and cut into fixed batches of
    --batch-size: the same batches whatever the number of processes or how often it resumed."""
    (dataset, items), stamps = selection
    size = config.batch_size
    return _Work(checkpoint, config, plan, store, _map_names(items), [], several, dataset.root,
                 [items[i:i + size] for i in range(0, len(items), size)], stamps=stamps,
                 order={item.path: i for i, item in enumerate(items)})


def _evaluate(work: _Work, ranks: Any, device: torch.device, progress: _Progress) -> list[str]:
    """This rank's batches of one checkpoint, resuming where results exist.

    A batch with anything left is computed whole (its finished rows are not written again), so
    every image is always computed in the same batch and the numbers never depend on the world
    size or on where a run was resumed. With --save-maps, images whose scores exist but whose maps
    do not get their maps written. Returns the methods that could not run on this model.
    """
    model, info, plan = work.checkpoint.model.to(device), work.checkpoint.info, work.plan
    methods = _build_methods(work, model, info)
    for chunk in ranks.shard(work.batches):
        if not any(work.needs(it, name) for it in chunk for name in plan.methods):
            continue  # a finished batch
        for batch, failures in _batches(work.root, chunk, info):
            for item, message in failures:
                if any(work.needs(item, n) for n in plan.methods):
                    tqdm.write(f"relprop evaluate: skipping {item.path}: {message}", file=sys.stderr)
                    work.store.skip({"checkpoint_sha256": work.checkpoint.sha256,
                                     "image": item.path, "error": message})
                    progress.update(sum(len(work.pending(item, n)) for n in plan.methods))
            if batch is not None:
                _evaluate_batch(work, batch, methods, device, progress)
    work.current = ""
    return work.failed


def _build_methods(work: _Work, model: torch.nn.Module, info: ModelInfo) -> dict[str, Any]:
    methods = {}
    for base in work.plan.bases:
        try:
            methods[base] = get_method(base, model, batch_size=work.config.batch_size,
                                       mean=info.mean, std=info.std, layer=work.config.cam_layer)
        except Exception as error:  # any model a method cannot handle: report it, go on
            work.fail(base, error)
    return methods


def _batches(root: Path, items: Sequence[Any],
             info: ModelInfo) -> Iterator[tuple[_Batch | None, list[tuple[Any, str]]]]:
    """One fixed batch preprocessed, split by input size (uncropped sizes may differ), with the
    images that could not be read."""
    transform = BoundedTransform(preprocessing(info), info.preprocessing.resize)
    loaded, failures = [], []
    for item in items:
        try:
            loaded.append((item, *load_item(root, item, transform, info)))
        except ImageError as error:
            failures.append((item, str(error)))
    if not loaded:
        yield None, failures
        return
    for size in dict.fromkeys(tuple(x.shape) for _, x, _ in loaded):
        group = [row for row in loaded if tuple(row[1].shape) == size]
        yield _Batch([g[0] for g in group], torch.stack([g[1] for g in group]),
                     [g[2] for g in group]), failures
        failures = []


def _evaluate_batch(work: _Work, batch: _Batch, methods: dict[str, Any], device: torch.device,
                    progress: _Progress) -> None:
    """Method by method, the whole batch at once on the device: maps, then each protocol's frames."""
    model = work.checkpoint.model
    x = batch.inputs.to(device)
    with torch.no_grad():
        logits = model(x)
    preds = logits.argmax(dim=1)
    work.broken = {i: "the model's output is NaN or infinite on this image"
                   for i in range(len(batch.items)) if not bool(torch.isfinite(logits[i]).all())}
    work.current = f"{batch.items[0].path} (+{len(batch.items) - 1} in its batch)"
    places = sorted(work.order.get(item.path, 0) + 1 for item in batch.items)
    work.span = (f"image {places[0]}" if len(places) == 1 else f"images {places[0]}-{places[-1]}") + \
        f" of {len(work.order)}"
    for base_name in list(methods):
        names = [n for n in work.plan.methods if n.removesuffix(HQ_SUFFIX) == base_name]
        if not any(work.needs(item, n) for item in batch.items for n in names):
            continue
        progress.note(f"{work.span}: {base_name}")
        try:
            maps, sums = _attribute(methods[base_name], x)
        except Exception as error:  # e.g. a CAM layer that does not fit: drop the method
            work.fail(base_name, error)
            del methods[base_name]
            progress.update(sum(len(work.pending(it, n)) for it in batch.items for n in names))
            continue
        for name in names:
            _score_batch(work, batch, x, preds, methods[base_name], name, maps, sums, progress)


def _score_batch(work: _Work, batch: _Batch, x: torch.Tensor, preds: torch.Tensor, base: Any,
                 name: str, maps: torch.Tensor, sums: dict[str, torch.Tensor] | None,
                 progress: _Progress) -> None:
    """Save the maps (with --save-maps) and score the protocols still pending, one row per image
    written as soon as its batch is scored."""
    config, info = work.config, work.checkpoint.info
    flat = (HeatQuantized(base, config.channels).quantize(maps)[:, 0] if name.endswith(HQ_SUFFIX)
            else base.to_2d(maps, config.channels))
    flat = flat.float().cpu()
    broken = dict(work.broken)
    for i in range(len(batch.items)):
        if i not in broken and not bool(torch.isfinite(flat[i]).all()):
            broken[i] = f"the {name} map has NaN or infinite values"
    if config.save_maps:
        for i, item in enumerate(batch.items):
            if i not in broken and work.needs_map(item, name):
                path = work.map_file(item, name)
                save_map(path, flat[i].numpy())  # whole or not at all: then it counts as saved
                work.whole_maps[path] = True
    boxes = None
    labels = torch.tensor([item.label for item in batch.items], device=x.device)
    for protocol in work.plan.protocols:
        todo = [i for i, item in enumerate(batch.items) if protocol in work.pending(item, name)]
        if not todo:
            continue
        boxes = boxes or localization(flat, batch.boxes)
        progress.note(f"{work.span}: {name} {protocol}")
        # read from the module when called, so that it can be swapped (a test interrupts a run by it)
        result = metrics.insertion_deletion(work.checkpoint.model, x, flat, labels, protocol,
                                            mean=info.mean, std=info.std, step=config.step,
                                            block=config.block,
                                            batch_size=max(config.batch_size, MIN_FRAME_BATCH),
                                            ties=config.ties, seed=config.seed,
                                            ids=[item.path for item in batch.items])
        for i in todo:
            row = _record(work.checkpoint, batch.items[i], name, protocol, config, base,
                          preds[i], result, i, boxes[i], sums, work.stamps.get(batch.items[i].path))
            work.store.add(_checked(row, broken.get(i)))
            progress.update(1)


def _attribute(method: Any, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Maps of the predicted class; relprop LRP methods also give their conservation report."""
    if method.is_lrp:
        return method.attribute(x, return_layer_sums=True)
    return method.attribute(x), None


def _checked(row: ResultRow, broken: str | None) -> ResultRow:
    """The row, or, where the model's output, the map or any number in the row is NaN or
    infinite, the same key as a failure with its reason and no numbers: never a score."""
    if broken is None:
        numbers = [*row.scores.values(), *row.insertion_curve, *row.deletion_curve,
                   *(row.localization or {}).values(),
                   *([] if row.conservation is None else row.conservation.to_dict().values())]
        bad = [v for v in numbers if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            broken = ("a score is NaN or infinite (the model gave NaN/Inf on a perturbed frame)"
                      if any(not math.isfinite(row.score(k)) for k in METRICS)
                      else "a localization or conservation value is NaN or infinite")
    if broken is None:
        return row
    tqdm.write(f"relprop evaluate: {row.image} {row.method} {row.protocol}: failed: {broken}; "
               "recorded as a failure, in no mean", file=sys.stderr)
    return replace(row, scores={key: None for key in METRICS}, insertion_curve=[],
                   deletion_curve=[], localization=None, conservation=None, failure=broken)


def _record(checkpoint: Checkpoint, item: Any, method: str, protocol: str, config: EvalConfig, base: Any,
            pred: torch.Tensor, result: Any, i: int, box_scores: dict[str, Any] | None,
            sums: dict[str, torch.Tensor] | None, stamp: str | None = None) -> ResultRow:
    return ResultRow(
        checkpoint=checkpoint.path,
        checkpoint_sha256=checkpoint.sha256,
        image=item.path,
        label=int(item.label),
        pred=int(pred),
        method=method,
        protocol=protocol,
        channels="sum" if base.is_lrp else config.channels,
        scores={key: metric.score(result, i) for key, metric in METRICS.items()},
        insertion_curve=[float(v) for v in result.insertion_curves[i]],
        deletion_curve=[float(v) for v in result.deletion_curves[i]],
        localization=box_scores,
        conservation=_conservation(sums, i),
        input=stamp,
        ties=config.ties,
        seed=config.seed,
    )


def _conservation(sums: dict[str, torch.Tensor] | None, i: int) -> Conservation | None:
    """Relevance totals at the output, the last and the first residual block, and the input."""
    if sums is None:
        return None
    blocks = [k for k in sums if "." in k]  # residual blocks, e.g. "layer4.1", output to input
    output, input_ = float(sums["output"][i]), float(sums["input"][i])
    if not blocks:
        return Conservation(output, input_)
    return Conservation(output, input_, float(sums[blocks[0]][i]), blocks[0],
                        float(sums[blocks[-1]][i]), blocks[-1])


def _map_names(items: Sequence[Any]) -> dict[str, str]:
    """Image stems name the saved maps; where stems collide, the relative path stands in."""
    stems = [Path(it.path).stem for it in items]
    unique = len(set(stems)) == len(stems)
    return {it.path: (Path(it.path).stem if unique else str(Path(it.path).with_suffix("")).replace("/", "__"))
            for it in items}


def _write_summary(out: Path, summary: dict[str, Any], run: RunRows, plan: Plan,
                   baseline: str | None = None) -> None:
    """summary.json, summary.md and the curves, each written whole or not at all."""
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    notes = run.counts.notes()
    text = (summary_markdown(summary, plan.protocols, notes) + "\n"
            + statistics_markdown(summary, plan.protocols))
    if baseline is not None:
        text += "\n" + compare_markdown(paired_differences(run.rows, baseline), baseline)
    write_atomic(out / "summary.md", text)
    curves = run.curves.means()
    for protocol in plan.protocols:
        if protocol in curves:
            aucs = {m: {k: s["protocols"][protocol][k] for k in ("insertion", "deletion")}
                    for m, s in summary.items() if protocol in s["protocols"]}
            write_atomic(out / f"curves_{protocol}.png",
                         lambda path, c=curves[protocol], a=aucs, p=protocol: plot_curves(c, a, p, path))
