"""Turn a `relprop evaluate` output folder into an offline HTML report (index.html + image files).

The report has to open from a USB stick or an e-mail attachment: no script, font or style is
loaded from the network, every picture is a file next to index.html, and every name that comes
from the run (file names, class names, method names) is escaped, in HTML by `html.escape` and in
the gallery's JSON by escaping `<`, `>` and `&`, and the gallery script only ever sets
`textContent`. The gallery is paged in the browser so that thousands of images stay fast.
"""

from __future__ import annotations

import html
import json
import math
import re
import shlex
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from relprop.errors import ImageError, InputError, RelpropError
from relprop.evaluation.metrics import METRICS
from relprop.evaluation.results import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    ReadCounts,
    ResultRow,
    as_rows,
    format_ci,
    format_mean_std,
    mean_curves,
    mean_std,
    read_rows,
    read_run_info,
    read_union,
    run_inputs,
    scored,
    shard_files,
    skipped_key,
    write_atomic,
)
from relprop.evaluation.statistics import mean_sem_ci
from relprop.images import load_image
from relprop.methods import canonical_name
from relprop.modelinfo import Preprocessing
from relprop.models import class_names_of, load_model, preprocessing
from relprop.viz import heat_2d, plot_conservation, plot_curves, render_map, save_png

PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")


@dataclass
class EvalRun:
    """What `relprop evaluate` left in its output folder."""

    root: Path
    records: list[ResultRow]
    info: dict[str, Any] = field(default_factory=dict)  # run.json (provenance), may be empty
    skipped: list[dict[str, Any]] = field(default_factory=list)  # skipped.jsonl, still unread
    counts: ReadCounts = field(default_factory=ReadCounts)  # rows left out: failed, duplicates


@dataclass
class SummaryRow:
    """Means and standard deviations of one (checkpoint, method, protocol) group."""

    checkpoint: str
    method: str
    protocol: str
    count: int
    scores: dict[str, tuple[float, float]]  # column -> (mean, std); NaN when absent


# ---------------------------------------------------------------- reading the run


def read_run(root: str | Path) -> EvalRun:
    """Read the results (results.jsonl and, of a sharded run, every results.rank<r>.jsonl) and
    run.json (optional); one clear error if unusable."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder (give the --out folder of `relprop evaluate`)")
    if not shard_files(root, "results"):
        raise InputError(f"{root}: no results.jsonl here; is this the --out folder of `relprop evaluate`?")
    info, counts = read_run_info(root / "run.json"), ReadCounts()
    every = read_rows(root, canonical=canonical_name, inputs=run_inputs(info), counts=counts)
    records = _one_spelling(scored(every))
    if not records:
        more = f" ({'; '.join(counts.notes())})" if counts.notes() else ""
        raise InputError(f"{root / 'results.jsonl'}: no results yet{more} (did `relprop evaluate` "
                         "finish any image?)")
    return EvalRun(root, records, info, _still_skipped(root, every), counts)


def _one_spelling(records: list[ResultRow]) -> list[ResultRow]:
    """Each method under one name: the spelling of its latest record (a run resumed under the
    registry's name after `ours` shows one `lrp-split` row)."""
    latest = {canonical_name(r.method): r.method for r in records}
    return [replace(r, method=latest[canonical_name(r.method)]) for r in records]


def _still_skipped(root: Path, records: Sequence[ResultRow]) -> list[dict[str, Any]]:
    """The skipped images (of every process) without those a later run did evaluate."""
    evaluated = {(r.checkpoint_sha256, r.image) for r in records}
    return [{k: str(v) for k, v in s.items()} for s in read_union(root, "skipped", skipped_key)
            if skipped_key(s) not in evaluated]


def run_value(info: Mapping[str, Any], *path: str | int) -> Any:
    """The value at `path` in run.json (`"settings", "data"`), None where the run has none.

    run.json as `relprop evaluate` writes it: `settings` (checkpoints [{path, sha256}], preprocessing
    [{resize, crop, mean, std}] per checkpoint, data, methods, ...), `labels` (classes,
    class_names), and the provenance (versions, platform, started, command, resumed).
    """
    value: Any = info
    for key in path:
        if isinstance(key, int):
            value = value[key] if isinstance(value, list) and len(value) > key else None
        else:
            value = value.get(key) if isinstance(value, Mapping) else None
    return value


def class_names(run: EvalRun) -> list[str] | None:
    """Readable class names: from run.json, else from the (first) checkpoint's file, else None."""
    for key in ("class_names", "classes"):
        names = run_value(run.info, "labels", key)
        if isinstance(names, list) and names:
            return [str(name) for name in names]
    path = run_value(run.info, "settings", "checkpoints", 0, "path")
    if not isinstance(path, str) or not Path(path).is_file():
        return None
    try:
        _, info = load_model(path)
    except RelpropError:  # e.g. a plain state dict, which needs --arch: fall back to indices
        return None
    return class_names_of(info)


def _label(names: Sequence[str] | None, index: Any, given: Any = None) -> str:
    if given is not None:
        return str(given)
    if names is not None and isinstance(index, int) and 0 <= index < len(names):
        return names[index]
    return "?" if index is None else str(index)


# ---------------------------------------------------------------- numbers


def _ordered(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def summarize(records: Sequence[ResultRow | Mapping[str, Any]]) -> tuple[list[str], list[SummaryRow]]:
    """Columns and one row per (checkpoint, method, protocol), in the run's order."""
    records = as_rows(records)
    loc_keys = _ordered(k for r in records for k in (r.localization or {}))
    columns = list(METRICS) + [f"loc:{k}" for k in loc_keys]
    if any(conservation_error(r) is not None for r in records):
        columns.append("conservation error")
    groups: OrderedDict[tuple[str, str, str], list[ResultRow]] = OrderedDict()
    for r in records:
        groups.setdefault((r.checkpoint, r.method, r.protocol), []).append(r)
    rows = []
    for (checkpoint, method, protocol), group in groups.items():
        scores = {c: mean_std([_column_value(r, c) for r in group]) for c in columns}
        rows.append(SummaryRow(checkpoint, method, protocol, len(group), scores))
    return columns, rows


def _column_value(record: ResultRow, column: str) -> float:
    if column.startswith("loc:"):
        return _number((record.localization or {}).get(column[4:]))
    if column == "conservation error":
        error = conservation_error(record)
        return math.nan if error is None else error
    return record.score(column)


def block_sums(record: ResultRow) -> dict[str, tuple[str, float]]:
    """{"last": (name, sum), "first": (name, sum)} of the residual blocks a row reports."""
    cons = record.conservation
    found = {}
    if cons is not None and cons.last_block is not None:
        found["last"] = (cons.last_block_name or "last block", cons.last_block)
    if cons is not None and cons.first_block is not None:
        found["first"] = (cons.first_block_name or "first block", cons.first_block)
    return found


def conservation_error(record: ResultRow) -> float | None:
    """|input sum − explained output| / |explained output|: 0 means nothing leaked."""
    return None if record.conservation is None else record.conservation.error


# ---------------------------------------------------------------- figures


def conservation_points(records: Sequence[ResultRow | Mapping[str, Any]],
                        ) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """panel title -> method -> [(explained output, relevance sum)], one point per image.

    Panels: the last residual block, the first residual block (as in the paper) and the input.
    """
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    seen: set[tuple[str, str]] = set()
    for r in as_rows(records):
        key = (r.method, r.image)
        if r.conservation is None or key in seen:  # one point per image, whatever the protocols
            continue
        seen.add(key)
        blocks = block_sums(r)
        points = [(f"{which} residual block ({blocks[which][0]})", blocks[which][1])
                  for which in ("last", "first") if which in blocks]
        points.append(("input", r.conservation.input))
        for title, value in points:
            panels.setdefault(title, {}).setdefault(key[0], []).append((r.conservation.output, value))
    return panels


# ---------------------------------------------------------------- gallery


@dataclass
class GalleryContext:
    """Where to find originals and maps, and how to draw them."""

    run: EvalRun
    out: Path
    data_root: Path | None
    geometry: Preprocessing | None
    sign: str
    names: list[str] | None


def map_path(root: Path, method: str, image: str, checkpoint: str | None = None) -> Path | None:
    """The map `evaluate --save-maps` wrote: `maps/[<checkpoint stem>/]<method>/<name>.npy`,
    where name is the image's stem, or its relative path with `/` as `__` when stems collide."""
    folders = [root / "maps" / method]
    if checkpoint:
        folders.insert(0, root / "maps" / Path(checkpoint).stem / method)
    relative = Path(image).with_suffix("")
    names = [Path(image).stem, relative.as_posix().replace("/", "__"), relative.as_posix()]
    for folder in folders:
        for name in names:
            if (folder / f"{name}.npy").is_file():
                return folder / f"{name}.npy"
    return None


def original_picture(context: GalleryContext, image: str, shape: tuple[int, int] | None) -> np.ndarray | None:
    """The image as the model saw it (the run's resize/crop), or None if the file is not there."""
    if context.data_root is None:
        return None
    try:
        img = load_image(context.data_root / image)
    except ImageError:
        return None
    if context.geometry is not None:
        tensor = preprocessing(context.geometry)(img)
        picture = np.clip(np.rint(tensor.numpy().transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)
        if shape is None or picture.shape[:2] == shape:
            return picture
    if shape is None:
        return np.asarray(img)
    return np.asarray(img.resize((shape[1], shape[0])))


def build_gallery(context: GalleryContext) -> tuple[list[dict[str, Any]], list[str], int]:
    """Write thumbnails; return (rows for the page's JSON, methods, number of maps found)."""
    records = _gallery_records(context.run.records)
    methods = _ordered(r.method for per in records.values() for r in per)
    rows = [_gallery_row(context, index, image, per_method) for index, (image, per_method)
            in enumerate(tqdm(records.items(), desc="gallery", unit="image", disable=None))]
    found = sum(cell["src"] is not None for row in rows for cell in row["cells"].values())
    return rows, methods, found


def _gallery_row(context: GalleryContext, index: int, image: str,
                 per_method: Sequence[ResultRow]) -> dict[str, Any]:
    """One image: its picture, labels, and per method a map thumbnail and the scores."""
    folder = context.out / "img" / f"{index:06d}"
    maps = [_load_map(map_path(context.run.root, r.method, image, r.checkpoint)) for r in per_method]
    shape = next((m.shape for m in maps if m is not None), None)
    picture = original_picture(context, image, shape)
    first = per_method[0]
    row: dict[str, Any] = {
        "image": image,
        "label": _label(context.names, first.label),
        "pred": _label(context.names, first.pred),
        "orig": None if picture is None else _relative(save_png(folder / "orig.png", picture), context.out),
        "cells": {},
    }
    for number, (record, heat) in enumerate(zip(per_method, maps, strict=True)):
        src = None
        if heat is not None:
            base = picture if picture is not None and picture.shape[:2] == heat.shape else \
                np.full((*heat.shape, 3), 200, np.uint8)  # no original: the map on flat grey
            src = _relative(save_png(folder / f"m{number}.png", render_map(base, heat, context.sign)),
                            context.out)
        scores = {"id": record.score("id"), "ins": record.score("insertion"),
                  "del": record.score("deletion")}
        row["cells"][record.method] = {
            "src": src, **{k: (v if math.isfinite(v) else None) for k, v in scores.items()},
        }
    return row


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _gallery_records(records: Sequence[ResultRow]) -> OrderedDict[str, list[ResultRow]]:
    """image -> one row per method: the first checkpoint and the first protocol of the run."""
    checkpoint, protocol = records[0].checkpoint, records[0].protocol
    chosen: OrderedDict[str, list[ResultRow]] = OrderedDict()
    for r in records:
        if r.checkpoint != checkpoint or r.protocol != protocol:
            continue
        per = chosen.setdefault(r.image, [])
        if all(other.method != r.method for other in per):
            per.append(r)
    return chosen


def _load_map(path: Path | None) -> np.ndarray | None:
    if path is None:
        return None
    try:
        return heat_2d(np.load(path, allow_pickle=False))
    except (OSError, ValueError, EOFError, RelpropError):  # a cut, empty or foreign file: no map
        return None


# ---------------------------------------------------------------- HTML


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _json_for_script(data: Any) -> str:
    """JSON that cannot end the <script> element it sits in, whatever the file names contain."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e") \
        .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _fmt_percent(mean: float, std: float) -> str:
    """Conservation errors are tiny for relprop and large for leaky rules: percent, 3 digits."""
    if not math.isfinite(mean):
        return "–"
    text = f"{100 * mean:.3g}"
    if "e" in text or not math.isfinite(std):
        return f"{text} %" + (f" ± {100 * std:.2g} %" if math.isfinite(std) else "")
    decimals = len(text.partition(".")[2])
    return f"{text} % ± {100 * std:.{decimals}f} %"


def summary_table(columns: Sequence[str], rows: Sequence[SummaryRow]) -> str:
    """The sortable summary table (the script sorts on data-value)."""
    keys = ["checkpoint"] if len({r.checkpoint for r in rows}) > 1 else []
    head = "".join(f'<th scope="col" data-type="text">{_esc(k)}</th>'
                   for k in keys + ["method", "protocol"])
    head += '<th scope="col" data-type="number">images</th>'
    head += "".join(f'<th scope="col" data-type="number">{_breakable(c)}</th>' for c in columns)
    body = []
    for r in rows:
        cells = [r.checkpoint] if keys else []
        tds = "".join(f'<td data-value="{_esc(v)}">{_esc(v)}</td>' for v in cells + [r.method, r.protocol])
        tds += f'<td data-value="{r.count}">{r.count}</td>'
        for c in columns:
            mean, std = r.scores[c]
            value = "" if not math.isfinite(mean) else repr(mean)
            text = _fmt_percent(mean, std) if c == "conservation error" else format_mean_std(mean, std)
            tds += f'<td data-value="{value}">{_two_lines(text)}</td>'
        body.append(f"<tr>{tds}</tr>")
    return (f'<div class="scroll"><table id="summary" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def uncertainty_table(records: Sequence[ResultRow]) -> str:
    """Per (checkpoint, method, protocol): mean, standard error and 95 % bootstrap CI over images
    of each metric (the numbers of summary.md's uncertainty section)."""
    groups: OrderedDict[tuple[str, str, str], list[ResultRow]] = OrderedDict()
    for r in records:
        groups.setdefault((r.checkpoint, r.method, r.protocol), []).append(r)
    several = len({k[0] for k in groups}) > 1
    head = ("<th>checkpoint</th>" if several else "") + "<th>method</th><th>protocol</th><th>images</th>"
    head += "".join(f"<th>{_esc(m.title)} {m.arrow}<br>mean (SE)</th><th>95 % CI</th>" for m in METRICS.values())
    body = []
    for (checkpoint, method, protocol), group in groups.items():
        group = sorted(group, key=lambda r: r.image)  # image order, as summary.md
        cells = ([checkpoint] if several else []) + [method, protocol, str(len(group))]
        tds = "".join(f"<td>{_esc(c)}</td>" for c in cells)
        for key in METRICS:
            mean, sem, low, high = mean_sem_ci([r.score(key) for r in group],
                                               n_boot=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)
            text = "–" if not math.isfinite(mean) else (
                f"{mean:.3f} ({sem:.3f})" if math.isfinite(sem) else f"{mean:.3f}")
            tds += f"<td>{text}</td><td>{format_ci(low, high)}</td>"
        body.append(f"<tr>{tds}</tr>")
    return (f'<h3 id="uncertainty-h">Uncertainty over images</h3><p class="hint">Mean, standard '
            f"error and 95 % percentile bootstrap confidence interval of the mean over images "
            f"({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}); for paired tests between "
            f"methods run <code>relprop compare EVAL_OUT --baseline METHOD</code>.</p>"
            f'<div class="scroll"><table id="uncertainty"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _breakable(name: str) -> str:
    """A heading that may wrap after `:` and `_` (`loc:centre_pointing`), escaped."""
    return re.sub(r"([:_])", r"\1<wbr>", _esc(name))


def _two_lines(text: str) -> str:
    """`mean ± std` as the mean over a smaller std line: the table fits 1400 px without scrolling."""
    mean, sep, std = text.partition(" ± ")
    return _esc(mean) + (f'<span class="sd">± {_esc(std)}</span>' if sep else "")


def skipped_section(skipped: Sequence[dict[str, Any]]) -> str:
    """The images evaluate could not read, with its reason for each."""
    if not skipped:
        return ""
    rows = "".join(f'<tr><td>{_esc(s.get("image", "?"))}</td><td>{_esc(s.get("error", ""))}</td></tr>'
                   for s in skipped)
    return (f'<h2 id="skipped">Skipped images ({len(skipped)})</h2>'
            '<p class="hint">These images could not be read or were refused; they are in no number '
            'on this page.</p><table class="skipped"><thead><tr><th scope="col">image</th>'
            f'<th scope="col">reason</th></tr></thead><tbody>{rows}</tbody></table>')


def save_maps_command(run: EvalRun) -> str:
    """The evaluate command of the run again, with --save-maps (it adds the maps, keeps the scores)."""
    command = run.info.get("command")
    if isinstance(command, list) and len(command) > 1 and command[1] == "evaluate":
        args = [str(a) for a in command[1:] if a != "--save-maps"]
        return "relprop " + shlex.join(args) + " --save-maps"
    return f"relprop evaluate ... --save-maps --out {shlex.quote(str(run.root))}"


def provenance_items(info: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """run.json flattened to (key, text) pairs: nested dicts as `a.b`, lists joined."""
    items: list[tuple[str, str]] = []
    for key, value in info.items():
        name = f"{prefix}{key}"
        if name == "inputs.images":  # one entry per image: the count and hash above say it
            continue
        if isinstance(value, Mapping):
            items += provenance_items(value, f"{name}.")
        elif isinstance(value, list) and all(not isinstance(v, Mapping | list) for v in value):
            items.append((name, " ".join(str(v) for v in value) if key == "command" else
                          ", ".join(str(v) for v in value)))
        elif isinstance(value, list):
            items.append((name, json.dumps(value, ensure_ascii=False)))
        elif value is not None:
            items.append((name, str(value)))
    return items


def provenance_list(info: Mapping[str, Any]) -> str:
    """run.json as a definition list (command, data, checkpoints, versions, ...)."""
    items = provenance_items(info)
    if not items:
        return "<p>No run.json in this folder.</p>"
    return ('<details><summary>run details (run.json)</summary><dl class="prov">'
            + "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in items)
            + "</dl></details>")


def build_report(eval_out: str | Path, out: str | Path, *, data: str | Path | None = None,
                 sign: str = "all", page_size: int = 20) -> Path:
    """Write REPORT_DIR/index.html with its pictures; return the index path."""
    run = read_run(eval_out)
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    columns, rows = summarize(run.records)
    curve_figs = [
        (protocol, plot_curves(curves, _mean_aucs(rows, protocol), protocol,
                               out / "plots" / f"curves_{i}.png"))
        for i, (protocol, curves) in enumerate(mean_curves(run.records).items())
    ]
    panels = conservation_points(run.records)
    conservation_fig = plot_conservation(panels, out / "plots" / "conservation.png") if panels else None
    context = GalleryContext(run, out, _data_root(run, data), _geometry(run), sign, class_names(run))
    gallery, methods, found = build_gallery(context)
    page = render_page(run, columns, rows, curve_figs, conservation_fig, gallery, methods, found,
                       context, page_size)
    index = out / "index.html"
    write_atomic(index, page)  # whole or not at all: a full disk keeps the previous page
    return index


def _mean_aucs(rows: Sequence[SummaryRow], protocol: str) -> dict[str, dict[str, float]]:
    """method -> {"insertion": mean AUC, "deletion": mean AUC} of the first checkpoint."""
    aucs: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.protocol == protocol and row.method not in aucs:
            aucs[row.method] = {k: row.scores[k][0] for k in ("insertion", "deletion")}
    return aucs


def _data_root(run: EvalRun, data: str | Path | None) -> Path | None:
    if data is not None:
        return Path(data)
    found = run_value(run.info, "settings", "data")
    if isinstance(found, str) and found:
        path = Path(found)
        return path if path.is_absolute() or path.is_dir() else run.root / path
    return None


def _geometry(run: EvalRun) -> Preprocessing | None:
    """The first checkpoint's resize and crop (no normalization: the picture as the model saw it)."""
    resize = run_value(run.info, "settings", "preprocessing", 0, "resize")
    if resize is None:
        return None
    crop = run_value(run.info, "settings", "preprocessing", 0, "crop")
    return Preprocessing(resize, crop, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def render_page(run: EvalRun, columns: Sequence[str], rows: Sequence[SummaryRow],
                curve_figs: Sequence[tuple[str, Path]], conservation_fig: Path | None,
                gallery: list[dict[str, Any]], methods: list[str], found: int,
                context: GalleryContext, page_size: int) -> str:
    """The whole index.html as one string."""
    def rel(path: Path) -> str:
        return _esc(path.relative_to(context.out).as_posix())

    curves = "".join(f'<figure><img src="{rel(p)}" alt="mean insertion and deletion curves, '
                     f'{_esc(protocol)} protocol"></figure>' for protocol, p in curve_figs) \
        or "<p>No insertion/deletion curves in this run.</p>"
    if conservation_fig is not None:
        conservation = (f'<figure><img src="{rel(conservation_fig)}" alt="conservation scatter">'
                        "<figcaption>One point per image and LRP method. On the dashed diagonal the "
                        "relevance that reached the layer equals the explained output: nothing "
                        "leaked or was created on the way.</figcaption></figure>")
    else:
        conservation = ("<p>No conservation data: the run has no LRP method, or it was made "
                        "without per-layer relevance sums.</p>")
    notice = "" if found else (
        '<p class="notice" id="no-maps">This run saved no maps, so the gallery shows scores only. '
        "To see the maps, run the same evaluation again with <code>--save-maps</code> into the "
        "same <code>--out</code>: it writes the maps of the images already scored without "
        "scoring them again: <code>" + _esc(save_maps_command(run)) + "</code>, then "
        "<code>relprop report " + _esc(shlex.quote(str(run.root))) + " --out "
        + _esc(shlex.quote(str(context.out))) + "</code>.</p>")
    left_out = "".join(f'<p class="notice">{_esc(note)}.</p>' for note in run.counts.notes())
    missing_originals = "" if any(r["orig"] for r in gallery) else (
        '<p class="notice">Original images not found; pass <code>--data DIR</code> '
        "(the folder given to <code>relprop evaluate --data</code>).</p>")
    replacements = {
        "TITLE": _esc(f"relprop report: {run.root.name}"),
        "HEADING": _esc(run.root.name),
        "PROVENANCE": provenance_list(run.info),
        "COUNT": _esc(len(gallery)),
        "SUMMARY": summary_table(columns, rows) + uncertainty_table(run.records),
        "SKIPPED": skipped_section(run.skipped),
        "CURVES": curves,
        "CONSERVATION": conservation,
        "NOTICE": left_out + notice + missing_originals,
        "GALLERY_JSON": _json_for_script({"rows": gallery, "methods": methods,
                                          "pageSize": page_size}),
    }
    replacements.update(STYLE=_asset("report.css"), SCRIPT=_asset("report.js"))
    # One pass: a value that happens to contain "@@KEY@@" (a file name) is never substituted again.
    return PLACEHOLDER.sub(lambda m: replacements[m[1]], _asset("index.html"))


def _asset(name: str) -> str:
    """A file of the page (index.html, report.css, report.js), shipped as package data."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")

