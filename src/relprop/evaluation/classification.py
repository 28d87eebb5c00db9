"""The evaluation behind `relprop evaluate`: explain, score, append, summarize (resumable)."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relprop import __version__
from relprop.cli.common import resolve_device
from relprop.cli.evaluate import MIN_FRAME_BATCH
from relprop.cli.outputs import prepare_out
from relprop.errors import ImageError, InputError, RelpropError

METRICS = ("insertion", "deletion", "id")
LOCALIZATION = ("pointing", "energy", "centre_pointing", "centre_energy")
UNORDERED_SETTINGS = ("methods", "protocols")  # listing them in another order changes no number


@dataclass
class Plan:
    """What to compute: requested method names, the base methods they need, the protocols."""

    methods: list[str]
    bases: list[str]
    protocols: list[str]


def run(args: argparse.Namespace) -> int:
    from relprop.evaluation.metrics import PROTOCOLS

    _check_numbers(args)
    args.device = resolve_device(args.device)
    if args.task == "detection":
        from relprop.evaluation.detection import run_from_evaluate_args

        prepare_out(args.out)
        return run_from_evaluate_args(args)
    out = _prepare_out(args)
    plan = _plan(args.methods, args.protocol, PROTOCOLS)
    checkpoints = [_Checkpoint.load(path, args) for path in args.weights or [None]]
    settings = _settings(args, plan, checkpoints)
    _check_resume(out / "run.json", settings)
    _record_labels(out / "run.json", checkpoints[0].meta)
    store = _Store(out)
    failed_methods: list[str] = []
    for checkpoint in checkpoints:
        failed_methods += _evaluate(checkpoint, args, plan, store, args.device)
    summary = summarize(store.records(), plan.methods, plan.protocols)
    _write_summary(out, summary, store.records(), plan)
    evaluated = {(sha, image) for sha, image, _, _ in store.done}
    total_skipped = len(store.skipped_keys() - evaluated)  # an image fixed since counts no more
    print(f"relprop evaluate: {len(store.done)} results in {out / 'results.jsonl'}; "
          f"summary in {out / 'summary.md'}", file=sys.stderr)
    if total_skipped:
        print(f"relprop evaluate: {total_skipped} unreadable image(s) skipped, listed in "
              f"{out / 'skipped.jsonl'}", file=sys.stderr)
    if failed_methods:
        print(f"relprop evaluate: method(s) {', '.join(dict.fromkeys(failed_methods))} could not "
              "run (named above); the others were evaluated", file=sys.stderr)
    return 1 if total_skipped or failed_methods else 0


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse meaningless counts before anything is loaded (`--limit -1` is not 'all but one')."""
    for option, value in (("--step", args.step), ("--block", args.block), ("--limit", args.limit),
                          ("--per-class", args.per_class), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise InputError(f"{option} {value}: must be at least 1")


def _prepare_out(args: argparse.Namespace) -> Path:
    """OUT must be writable, and not inside --data (its PNGs would be read as images)."""
    out = Path(args.out)
    if out.resolve().is_relative_to(Path(args.data).resolve()):
        raise InputError(f"--out {out} is inside --data {args.data}: its files would be read as "
                         "data; choose an --out outside the data folder")
    return prepare_out(args.out)


def _plan(methods: str, protocol: str, known_protocols: Sequence[str]) -> Plan:
    from relprop.methods import HQ_SUFFIX, METHOD_NAMES

    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names:
        raise InputError("--methods is empty")
    for name in names:
        if name.removesuffix(HQ_SUFFIX) not in METHOD_NAMES:
            raise InputError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)} "
                             f"(each also with {HQ_SUFFIX})")
    protocols = [p.strip() for p in protocol.split(",") if p.strip()]
    for p in protocols:
        if p not in known_protocols:
            raise InputError(f"unknown protocol {p!r}; choose from {', '.join(known_protocols)}")
    names, protocols = list(dict.fromkeys(names)), list(dict.fromkeys(protocols))
    bases = list(dict.fromkeys(n.removesuffix(HQ_SUFFIX) for n in names))
    return Plan(names, bases, protocols)


@dataclass
class _Checkpoint:
    path: str
    sha256: str
    model: torch.nn.Module
    meta: dict[str, Any]

    @classmethod
    def load(cls, path: str | None, args: argparse.Namespace) -> _Checkpoint:
        """A weights file or torchvision weights name (None: the command's default)."""
        from relprop.cli.common import load_model_from_args
        from relprop.models import file_sha256

        model, meta = load_model_from_args(args, "evaluate", weights=path)
        return cls(meta.get("weights") or str(path), file_sha256(meta["path"]), model, meta)


def _settings(args: argparse.Namespace, plan: Plan, checkpoints: Sequence[_Checkpoint]) -> dict[str, Any]:
    """Everything that changes the numbers; a resumed run must match it exactly."""
    from relprop.evaluation.metrics import PAPER_STEP, RISE_BLUR_SIGMA, RISE_BLUR_SIZE

    return {
        "checkpoints": [{"path": c.path, "sha256": c.sha256} for c in checkpoints],
        "preprocessing": [{k: c.meta[k] for k in ("resize", "crop", "mean", "std")} for c in checkpoints],
        "data": str(Path(args.data).resolve()),
        "methods": plan.methods,
        "protocols": plan.protocols,
        "channels": args.channels,
        "step": {"paper": args.step or PAPER_STEP, "rise": args.step or "image width"},
        "block": args.block,
        "rise_blur": {"size": RISE_BLUR_SIZE, "sigma": RISE_BLUR_SIGMA},
        "limit": args.limit,
        "per_class": args.per_class,
        "cam_layer": args.cam_layer,
    }


def _check_resume(path: Path, settings: dict[str, Any]) -> None:
    """Write provenance on the first run; refuse to resume under different settings, and note
    each resumption (with its versions) in run.json."""
    if not path.is_file():
        path.write_text(json.dumps({"settings": settings, **_provenance()}, indent=2) + "\n")
        return
    run_info = json.loads(path.read_text())
    previous = run_info.get("settings", {})
    changed = [k for k in settings if _comparable(k, previous.get(k)) != _comparable(k, settings[k])]
    if changed:
        key = changed[0]
        raise InputError(
            f"{path.parent} holds a run with different settings ({key}: {previous.get(key)!r} "
            f"now {settings[key]!r}); rerun with the same options to resume, or use a new --out"
        )
    run_info.setdefault("resumed", []).append(_provenance())
    path.write_text(json.dumps(run_info, indent=2) + "\n")


def _record_labels(path: Path, meta: dict[str, Any]) -> None:
    """The model's class ids and names, by which the labels were given (the report shows them)."""
    run_info = json.loads(path.read_text())
    run_info["labels"] = {"classes": list(meta["classes"]), "class_names": meta.get("class_names")}
    path.write_text(json.dumps(run_info, indent=2) + "\n")


def _comparable(key: str, value: Any) -> Any:
    if key in UNORDERED_SETTINGS and isinstance(value, list):
        return sorted(value)
    return value


def _provenance() -> dict[str, Any]:
    import captum
    import torchvision

    return {
        "versions": {"relprop": __version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "captum": captum.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "platform": platform.platform(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
    }


class _Store:
    """results.jsonl and skipped.jsonl, appended line by line so a killed run loses nothing."""

    def __init__(self, out: Path) -> None:
        self.results_path, self.skipped_path = out / "results.jsonl", out / "skipped.jsonl"
        self._records = _read_jsonl(self.results_path)
        self.done = {_key(r) for r in self._records}
        self._skipped = _read_jsonl(self.skipped_path)

    def records(self) -> list[dict[str, Any]]:
        return self._records

    def skipped_keys(self) -> set[tuple[str, str]]:
        return {(s["checkpoint_sha256"], s["image"]) for s in self._skipped}

    def add(self, record: dict[str, Any]) -> None:
        with open(self.results_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self._records.append(record)
        self.done.add(_key(record))

    def skip(self, record: dict[str, str]) -> None:
        if (record["checkpoint_sha256"], record["image"]) in self.skipped_keys():
            return
        with open(self.skipped_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self._skipped.append(record)


def _key(record: dict[str, Any]) -> tuple[str, str, str, str]:
    return record["checkpoint_sha256"], record["image"], record["method"], record["protocol"]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete lines only: a line cut by a kill is dropped (and cut from the file)."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if len(complete) != len(raw):
        path.write_bytes(complete)
    records = []
    for line in complete.decode().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


@dataclass
class _Batch:
    items: list[Any]
    inputs: torch.Tensor
    boxes: list[Any]


def _evaluate(checkpoint: _Checkpoint, args: argparse.Namespace, plan: Plan, store: _Store,
              device: torch.device) -> list[str]:
    """All methods and protocols on one checkpoint's images, resuming where results exist.

    With --save-maps, images whose scores exist but whose maps do not get their maps written
    (the scores are not computed again). Returns the methods that could not run on this model.
    """
    from tqdm import tqdm

    from relprop.data import discover, select

    model, meta = checkpoint.model.to(device), checkpoint.meta
    dataset = discover(args.data, meta["classes"], meta.get("class_names"))
    if dataset.unknown:
        listed = ", ".join(f"{name} ({n})" for name, n in sorted(dataset.unknown.items()))
        print(f"relprop evaluate: left out {sum(dataset.unknown.values())} images of "
              f"{len(dataset.unknown)} classes the model does not have: {listed}", file=sys.stderr)
    items = select(dataset.items, args.per_class, args.limit)
    work = _Work(checkpoint, args, plan, store, _map_names(items), [])
    todo = [it for it in items if any(work.needs(it, name) for name in plan.methods)]
    methods = _build_methods(work, model, meta)
    progress = tqdm(total=len(todo) * len(plan.methods), desc=f"evaluate {Path(checkpoint.path).name}",
                    unit="map", dynamic_ncols=True)
    for batch, failures in _batches(dataset.root, todo, meta, args.batch_size):
        for item, message in failures:
            tqdm.write(f"relprop evaluate: skipping {item.path}: {message}", file=sys.stderr)
            store.skip({"checkpoint_sha256": checkpoint.sha256, "image": item.path, "error": message})
        progress.update(len(failures) * len(plan.methods))
        if batch is not None:
            _evaluate_batch(work, batch, methods, device, progress)
    progress.close()
    return work.failed


@dataclass
class _Work:
    """What one checkpoint's evaluation needs to decide, per image and method, what is left."""

    checkpoint: _Checkpoint
    args: argparse.Namespace
    plan: Plan
    store: _Store
    stems: dict[str, str]
    failed: list[str]

    def pending(self, item: Any, name: str) -> list[str]:
        """Protocols not yet scored for (image, method)."""
        return [p for p in self.plan.protocols
                if (self.checkpoint.sha256, item.path, name, p) not in self.store.done]

    def map_file(self, item: Any, name: str) -> Path:
        folder = Path(self.args.out) / "maps"
        if len(self.args.weights) > 1:
            folder = folder / Path(self.checkpoint.path).stem
        return folder / name / f"{self.stems[item.path]}.npy"

    def needs(self, item: Any, name: str) -> bool:
        return bool(self.pending(item, name)) or (self.args.save_maps and
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
            methods[base] = get_method(base, model, batch_size=work.args.batch_size, mean=meta["mean"],
                                       std=meta["std"], layer=work.args.cam_layer)
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

    args, item, meta = work.args, batch.items[i], work.checkpoint.meta
    flat = (HeatQuantized(base, args.channels).quantize(maps)[:, 0] if name.endswith(HQ_SUFFIX)
            else base.to_2d(maps, args.channels))
    flat = flat.float().cpu()
    if args.save_maps:
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
                                    mean=meta["mean"], std=meta["std"], step=args.step,
                                    block=args.block, batch_size=max(args.batch_size, MIN_FRAME_BATCH))
        work.store.add(_record(work.checkpoint, item, name, protocol, args.channels, base, pred,
                               result, 0, boxes[0], sums, args.step))


def _attribute(method: Any, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Maps of the predicted class; relprop LRP methods also give their conservation report."""
    if method.is_lrp:
        return method.attribute(x, return_layer_sums=True)
    return method.attribute(x), None


def _record(checkpoint: _Checkpoint, item: Any, method: str, protocol: str, channels: str, base: Any,
            pred: torch.Tensor, result: Any, i: int, box_scores: dict[str, Any] | None,
            sums: dict[str, torch.Tensor] | None, step: int | None) -> dict[str, Any]:
    return {
        "checkpoint": checkpoint.path,
        "checkpoint_sha256": checkpoint.sha256,
        "image": item.path,
        "label": int(item.label),
        "pred": int(pred),
        "method": method,
        "protocol": protocol,
        "channels": "sum" if base.is_lrp else channels,
        "insertion": float(result.insertion[i]),
        "deletion": float(result.deletion[i]),
        "id": float(result.insertion[i] - result.deletion[i]),
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


def summarize(records: Sequence[dict[str, Any]], methods: Sequence[str],
              protocols: Sequence[str]) -> dict[str, Any]:
    """{method: {insertion, deletion, id (first protocol), *_std, n, ..., protocols: {p: {...}}}}.

    One checkpoint: mean and std over images. Several: mean and std over per-checkpoint means.
    """
    summary: dict[str, Any] = {}
    for method in methods:
        per_protocol = {}
        for protocol in protocols:
            rows = [r for r in records if r["method"] == method and r["protocol"] == protocol]
            if rows:
                per_protocol[protocol] = _aggregate(rows)
        if per_protocol:
            first = per_protocol[next(iter(per_protocol))]
            summary[method] = {**first, "protocol": next(iter(per_protocol)), "protocols": per_protocol}
    return summary


def _aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_checkpoint: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_checkpoint.setdefault(row["checkpoint_sha256"], []).append(row)
    means = [_means(group) for group in by_checkpoint.values()]
    if len(means) == 1:
        stats = _means(rows, with_std=True)
    else:  # the paper's seed table: spread of the per-checkpoint means
        stats = {}
        for key in means[0]:
            values = [m[key] for m in means if m[key] is not None]
            stats[key] = float(np.mean(values)) if values else None
            if key in METRICS:
                stats[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    stats["n"] = len(rows) if len(means) == 1 else min(len(g) for g in by_checkpoint.values())
    stats["checkpoints"] = len(means)
    return stats


def _means(rows: Sequence[dict[str, Any]], with_std: bool = False) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for key in METRICS:
        values = np.array([r[key] for r in rows], dtype=np.float64)
        stats[key] = float(values.mean())
        if with_std:
            stats[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    for key in LOCALIZATION:
        values = [r["localization"][key] for r in rows
                  if r.get("localization") and r["localization"].get(key) is not None]
        stats[key] = float(np.mean(values)) if values else None
    ratios = [r["conservation"]["input_over_output"] for r in rows
              if r.get("conservation") and r["conservation"].get("input_over_output") is not None]
    stats["conservation"] = float(np.mean(ratios)) if ratios else None
    return stats


def _write_summary(out: Path, summary: dict[str, Any], records: Sequence[dict[str, Any]],
                   plan: Plan) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary, plan.protocols))
    for protocol in plan.protocols:
        _plot_curves(out / f"curves_{protocol}.png", records, plan.methods, protocol)


def summary_markdown(summary: dict[str, Any], protocols: Sequence[str]) -> str:
    """The paper's table layout (Insertion up, Deletion down, ID up), one table per protocol."""
    lines = []
    for protocol in protocols:
        rows = {m: s["protocols"][protocol] for m, s in summary.items() if protocol in s["protocols"]}
        if not rows:
            continue
        first = next(iter(rows.values()))
        over = (f"mean ± std over {first['checkpoints']} checkpoints (per-checkpoint means)"
                if first["checkpoints"] > 1 else "mean ± std over images")
        lines += [f"## Protocol `{protocol}` ({over})", "",
                  "| Method | Insertion ↑ | Deletion ↓ | ID ↑ | n | Pointing ↑ | Energy ↑ | In/Out |",
                  "|---|---|---|---|---|---|---|---|"]
        for method, s in rows.items():
            cells = [f"{s[k]:.3f} ± {s[k + '_std']:.3f}" for k in METRICS]
            extra = [_fmt(s.get("pointing")), _fmt(s.get("energy")), _fmt(s.get("conservation"))]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {s['n']} | " + " | ".join(extra) + " |")
        centre = next((s for s in rows.values() if s.get("centre_pointing") is not None), None)
        if centre is not None:
            lines.append(f"| *centre-point baseline* | | | | | {_fmt(centre['centre_pointing'])} | "
                         f"{_fmt(centre['centre_energy'])} | |")
        lines.append("")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _plot_curves(path: Path, records: Sequence[dict[str, Any]], methods: Sequence[str],
                 protocol: str) -> None:
    """Mean insertion and deletion curves per method, on a common [0, 1] axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from relprop.methods import HQ_SUFFIX

    grid = np.linspace(0.0, 1.0, 101)
    bases = list(dict.fromkeys(m.removesuffix(HQ_SUFFIX) for m in methods))
    colours = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, kind in zip(axes, ("insertion", "deletion"), strict=True):
        for method in methods:
            curves = [np.interp(grid, np.linspace(0, 1, len(r[f"{kind}_curve"])), r[f"{kind}_curve"])
                      for r in records if r["method"] == method and r["protocol"] == protocol]
            if curves:  # one colour per base method; its +hq variant dashed
                colour = colours[bases.index(method.removesuffix(HQ_SUFFIX)) % len(colours)]
                ax.plot(grid, np.mean(curves, axis=0), label=method, color=colour,
                        linestyle="--" if method.endswith(HQ_SUFFIX) else "-")
        ax.set(title=f"{kind} ({protocol})", xlabel="fraction of pixels", ylabel="probability",
               ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)
