"""The results of `relprop evaluate`: results.jsonl (one `ResultRow` a line), skipped.jsonl and
run.json read and written, the one `summarize` (mean ± std, ddof = 1) and the markdown table.

The evaluation, the report and detection all go through here, so that the same run prints the same
numbers wherever it is shown. `ResultRow` is the one spelling of a row: the evaluation writes
`ResultRow.to_dict()`, and everything that reads results.jsonl (resume, summary, report, compare)
reads `ResultRow`s through `read_rows`. Scores are read generically from `metrics.METRICS`: a metric
added there appears in the summary, the markdown and the report without an edit here.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from relprop import __version__
from relprop.errors import InputError
from relprop.evaluation.metrics import LOCALIZATION, METRICS
from relprop.evaluation.statistics import mean_sem_ci

UNORDERED_SETTINGS = ("methods", "protocols")  # listing them in another order changes no number
CURVE_POINTS = 101
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 10000, 0  # every CI relprop prints


# ---------------------------------------------------------------- rows


@dataclass(frozen=True)
class Conservation:
    """Relevance totals of one LRP map: at the output (the explained probability), at the last and
    the first residual block (where the network has them) and at the input."""

    output: float
    input: float
    last_block: float | None = None
    last_block_name: str | None = None
    first_block: float | None = None
    first_block_name: str | None = None

    @property
    def input_over_output(self) -> float | None:
        return self.input / self.output if self.output else None

    @property
    def error(self) -> float | None:
        """|input sum − explained output| / |explained output|: 0 means nothing leaked."""
        return abs(self.input - self.output) / abs(self.output) if self.output else None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"output": self.output, "input": self.input}
        if self.last_block is not None:
            data.update(last_block=self.last_block, last_block_name=self.last_block_name,
                        first_block=self.first_block, first_block_name=self.first_block_name)
        data["input_over_output"] = self.input_over_output
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Conservation:
        return cls(float(data["output"]), float(data["input"]), _float(data.get("last_block")),
                   data.get("last_block_name"), _float(data.get("first_block")),
                   data.get("first_block_name"))


_ROW_FIELDS = ("checkpoint", "checkpoint_sha256", "image", "label", "pred", "method", "protocol",
               "channels", "insertion_curve", "deletion_curve", "localization", "conservation")


@dataclass(frozen=True)
class ResultRow:
    """One (checkpoint, image, method, protocol) of `relprop evaluate`: one line of results.jsonl.

    `scores` holds one value per metric of `metrics.METRICS` (insertion, deletion, id, ...), written
    at the top level of the line; `localization` the box scores (pointing, energy, and the centre
    baselines) where the data has boxes; `conservation` the relevance totals of the LRP methods.
    """

    image: str
    method: str
    protocol: str
    scores: dict[str, float | None] = field(default_factory=dict)
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    label: int | None = None
    pred: int | None = None
    channels: str = "sum"
    insertion_curve: list[float] = field(default_factory=list)
    deletion_curve: list[float] = field(default_factory=list)
    localization: dict[str, float | None] | None = None
    conservation: Conservation | None = None

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What identifies a row: a resumed run computes only the keys not yet in the files."""
        return self.checkpoint_sha256, self.image, self.method, self.protocol

    def score(self, metric: str) -> float:
        """The metric's value, NaN where the row has none."""
        value = self.scores.get(metric)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan

    def to_dict(self) -> dict[str, Any]:
        """The line of results.jsonl (this layout is the results format; see docs/results.md)."""
        return {
            "checkpoint": self.checkpoint, "checkpoint_sha256": self.checkpoint_sha256,
            "image": self.image, "label": self.label, "pred": self.pred, "method": self.method,
            "protocol": self.protocol, "channels": self.channels, **self.scores,
            "insertion_curve": list(self.insertion_curve),
            "deletion_curve": list(self.deletion_curve), "localization": self.localization,
            "conservation": None if self.conservation is None else self.conservation.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResultRow:
        """A line of results.jsonl; every key that is not a field of the row is a score."""
        try:
            conservation = data.get("conservation")
            return cls(
                image=str(data["image"]), method=str(data["method"]), protocol=str(data["protocol"]),
                scores={k: v for k, v in data.items() if k not in _ROW_FIELDS},
                checkpoint=str(data.get("checkpoint") or ""),
                checkpoint_sha256=str(data.get("checkpoint_sha256") or ""),
                label=data.get("label"), pred=data.get("pred"),
                channels=str(data.get("channels") or "sum"),
                insertion_curve=list(data.get("insertion_curve") or []),
                deletion_curve=list(data.get("deletion_curve") or []),
                localization=data.get("localization"),
                conservation=None if not conservation else Conservation.from_dict(conservation),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"not a result row of `relprop evaluate` ({type(error).__name__}: "
                             f"{error})") from None


def as_rows(records: Iterable[ResultRow | Mapping[str, Any]]) -> list[ResultRow]:
    """Rows, from rows or from their dict form (results.jsonl's lines)."""
    return [r if isinstance(r, ResultRow) else ResultRow.from_dict(r) for r in records]


def read_rows(out: Path, *, repair: Path | None = None) -> list[ResultRow]:
    """The rows of every results file in OUT (of every rank; the first of each key kept)."""
    return as_rows(read_union(out, "results", _row_key, repair=repair))


def _row_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
    return (record.get("checkpoint_sha256") or "", record.get("image"), record.get("method"),
            record.get("protocol"))


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


# ---------------------------------------------------------------- files


def read_jsonl(path: Path, *, repair: bool = False,
               on_partial: Callable[[Path], None] | None = None) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, one a line.

    A last line cut by a kill (no newline, or not JSON) is dropped (and `on_partial` told), and
    with `repair` cut from the file so that appending goes on cleanly; a bad line in the middle is
    one clear error.
    """
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete = lines[:-1]  # the part after the last newline is unfinished (or empty)
    partial = bool(lines[-1].strip())
    records: list[dict[str, Any]] = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number == len(complete):  # the last line, written by a run that was killed
                complete = complete[:-1]
                partial = True
                break
            raise InputError(f"{path}:{number}: not a JSON line") from None
        if isinstance(record, dict):
            records.append(record)
    if partial and on_partial is not None:
        on_partial(path)
    kept = b"".join(line + b"\n" for line in complete)
    if repair and kept != raw:
        path.write_bytes(kept)
    return records


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One whole line in one write, flushed and synced: a kill -9 at any moment leaves either the
    full line or none of it on disk (a reader still drops a cut last line, see `read_jsonl`)."""
    data = (json.dumps(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        while written < len(data):  # a short write (full disk, signal): finish the line
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- several writers (ranks)


def rank_file(out: Path, stem: str, rank: int, world: int) -> Path:
    """The file one process appends to: `results.jsonl` alone, `results.rank{r}.jsonl` when
    sharded. Readers take the union of all of them, so a resumed run may use another world
    size: no file is ever written by two processes at once."""
    return out / (f"{stem}.jsonl" if world == 1 else f"{stem}.rank{rank}.jsonl")


def shard_files(out: Path, stem: str) -> list[Path]:
    """Every file of `stem` in OUT: the single-process one, then the ranks' in rank order."""
    ranked = [p for p in out.glob(f"{stem}.rank*.jsonl") if p.name[len(stem) + 5:-6].isdigit()]
    ranked.sort(key=lambda p: int(p.name[len(stem) + 5:-6]))
    single = out / f"{stem}.jsonl"
    return ([single] if single.is_file() else []) + ranked


def read_union(out: Path, stem: str, key: Callable[[dict[str, Any]], Any], *,
               repair: Path | None = None) -> list[dict[str, Any]]:
    """The records of every shard file of `stem` (first of each `key` kept), a cut last line of
    any of them named on stderr and ignored; only the file `repair` (this process's own) is cut
    back, as no other process appends to it."""
    seen: set[Any] = set()
    records: list[dict[str, Any]] = []
    for path in shard_files(out, stem):
        for record in read_jsonl(path, repair=path == repair, on_partial=_report_partial):
            k = key(record)
            if k not in seen:
                seen.add(k)
                records.append(record)
    return records


def _report_partial(path: Path) -> None:
    print(f"relprop: {path}: ignored a partial last line (a run killed while writing it); "
          "that row is computed again on resume", file=sys.stderr)


def read_run_info(path: Path) -> dict[str, Any]:
    """run.json as a dict ({} when absent); one clear error when it is not JSON."""
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
    return info if isinstance(info, dict) else {}


def write_run_info(path: Path, info: dict[str, Any]) -> None:
    path.write_text(json.dumps(info, indent=2) + "\n")


def check_resume(path: Path, settings: dict[str, Any], canonical: Callable[[str], str]) -> None:
    """Write provenance on the first run; refuse to resume under different settings, and note each
    resumption (with its versions) in run.json. Method names compare through `canonical`, so a
    run written under an alias (`ours`) resumes under the registry's name and back."""
    if not path.is_file():
        write_run_info(path, {"settings": settings, **provenance()})
        return
    run_info = read_run_info(path)
    previous = run_info.get("settings", {})
    changed = [k for k in settings
               if _comparable(k, previous.get(k), canonical) != _comparable(k, settings[k], canonical)]
    if changed:
        key = changed[0]
        raise InputError(
            f"{path.parent} holds a run with different settings ({key}: {previous.get(key)!r} "
            f"now {settings[key]!r}); rerun with the same options to resume, or use a new --out"
        )
    run_info.setdefault("resumed", []).append(provenance())
    write_run_info(path, run_info)


def _comparable(key: str, value: Any, canonical: Callable[[str], str]) -> Any:
    if key == "methods" and isinstance(value, list):
        value = [canonical(str(v)) for v in value]
    if key in UNORDERED_SETTINGS and isinstance(value, list):
        return sorted(value)
    return value


def provenance() -> dict[str, Any]:
    """Versions, platform, time and command line of this process."""
    import captum  # deferred: captum is slow to import; only its version is read here

    return {
        "versions": {"relprop": __version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "captum": captum.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "platform": platform.platform(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
    }


# ---------------------------------------------------------------- numbers


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for one value) of the finite values:
    the one convention of every ± relprop prints."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0


def summarize(records: Sequence[ResultRow | Mapping[str, Any]], methods: Sequence[str],
              protocols: Sequence[str]) -> dict[str, Any]:
    """{method: {insertion, deletion, id (first protocol), *_std, n, ..., protocols: {p: {...}}}}.

    One checkpoint: mean and std over images. Several: mean and std over per-checkpoint means.
    Rows are taken in (checkpoint, image) order, so the numbers (the bootstrap CIs included) do
    not depend on which process wrote which row, or in what order.
    """
    rows_in_order = sorted(as_rows(records), key=lambda r: (r.checkpoint_sha256, r.image))
    summary: dict[str, Any] = {}
    for method in methods:
        per_protocol = {}
        for protocol in protocols:
            rows = [r for r in rows_in_order if r.method == method and r.protocol == protocol]
            if rows:
                per_protocol[protocol] = _aggregate(rows)
        if per_protocol:
            first = per_protocol[next(iter(per_protocol))]
            summary[method] = {**first, "protocol": next(iter(per_protocol)), "protocols": per_protocol}
    return summary


def _aggregate(rows: Sequence[ResultRow]) -> dict[str, Any]:
    by_checkpoint: dict[str, list[ResultRow]] = {}
    for row in rows:
        by_checkpoint.setdefault(row.checkpoint_sha256, []).append(row)
    means = [_means(group) for group in by_checkpoint.values()]
    if len(means) == 1:
        stats = _means(rows, with_std=True)
        stats.update(_uncertainty({key: [r.scores[key] for r in rows] for key in METRICS},
                                  bootstrap=True))
    else:  # the paper's seed table: spread of the per-checkpoint means
        stats = {}
        for key in means[0]:
            values = [m[key] for m in means if m[key] is not None]
            stats[key] = float(np.mean(values)) if values else None
            if key in METRICS:
                stats[key], stats[f"{key}_std"] = mean_std(values)
        stats.update(_uncertainty({key: [m[key] for m in means] for key in METRICS}, bootstrap=False))
    stats["n"] = len(rows) if len(means) == 1 else min(len(g) for g in by_checkpoint.values())
    stats["checkpoints"] = len(means)
    return stats


def _uncertainty(values: dict[str, list[float]], bootstrap: bool) -> dict[str, float]:
    """`<metric>_sem`, `_ci_low`, `_ci_high`: the standard error and the 95 % bootstrap CI of the
    mean over images; over a few checkpoints only the SE (a bootstrap of 3 to 5 seeds says little)."""
    found: dict[str, float] = {}
    for key, column in values.items():
        _, sem, low, high = mean_sem_ci(column, n_boot=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)
        found[f"{key}_sem"] = sem
        found[f"{key}_ci_low"], found[f"{key}_ci_high"] = (low, high) if bootstrap else (math.nan, math.nan)
    return found


def _means(rows: Sequence[ResultRow], with_std: bool = False) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for key in METRICS:
        mean, std = mean_std([r.scores[key] for r in rows])
        stats[key] = mean
        if with_std:
            stats[f"{key}_std"] = std
    for key in LOCALIZATION:
        values = [r.localization[key] for r in rows
                  if r.localization and r.localization.get(key) is not None]
        stats[key] = float(np.mean(values)) if values else None
    ratios = [r.conservation.input_over_output for r in rows
              if r.conservation is not None and r.conservation.input_over_output is not None]
    stats["conservation"] = float(np.mean(ratios)) if ratios else None
    return stats


def summary_markdown(summary: dict[str, Any], protocols: Sequence[str]) -> str:
    """The paper's table layout (Insertion up, Deletion down, ID up), one table per protocol."""
    lines = []
    header = " | ".join(f"{m.title} {m.arrow}" for m in METRICS.values())
    for protocol in protocols:
        rows = {m: s["protocols"][protocol] for m, s in summary.items() if protocol in s["protocols"]}
        if not rows:
            continue
        first = next(iter(rows.values()))
        over = (f"mean ± std over {first['checkpoints']} checkpoints (per-checkpoint means)"
                if first["checkpoints"] > 1 else "mean ± std over images")
        lines += [f"## Protocol `{protocol}` ({over})", "",
                  f"| Method | {header} | n | Pointing ↑ | Energy ↑ | In/Out |",
                  "|---|" + "---|" * len(METRICS) + "---|---|---|---|"]
        for method, s in rows.items():
            cells = [format_mean_std(s[k], s[k + "_std"]) for k in METRICS]
            extra = [_fmt(s.get("pointing")), _fmt(s.get("energy")), _fmt(s.get("conservation"))]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {s['n']} | " + " | ".join(extra) + " |")
        centre = next((s for s in rows.values() if s.get("centre_pointing") is not None), None)
        if centre is not None:
            lines.append(f"| *centre-point baseline* |{' |' * len(METRICS)} | "
                         f"{_fmt(centre['centre_pointing'])} | {_fmt(centre['centre_energy'])} | |")
        lines.append("")
    return "\n".join(lines)


def format_mean_std(mean: float, std: float) -> str:
    """`0.512 ± 0.034`: how summary.md and the report print a score."""
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.3f} ± {std:.3f}" if math.isfinite(std) else f"{mean:.3f}"


def statistics_markdown(summary: dict[str, Any], protocols: Sequence[str]) -> str:
    """Per protocol and method: mean, standard error and 95 % bootstrap CI of each metric."""
    lines = []
    for protocol in protocols:
        rows = {m: s["protocols"][protocol] for m, s in summary.items() if protocol in s["protocols"]}
        if not rows:
            continue
        several = next(iter(rows.values()))["checkpoints"] > 1
        over = ("over checkpoints (SE of the per-checkpoint means; no bootstrap over so few)"
                if several else f"over images; 95 % percentile bootstrap CI of the mean, "
                                f"{BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}")
        lines += [f"## Protocol `{protocol}`: uncertainty ({over})", "",
                  "| Method | n | " + " | ".join(f"{m.title} {m.arrow} mean | SE | 95 % CI"
                                               for m in METRICS.values()) + " |",
                  "|---|---|" + "---|---|---|" * len(METRICS)]
        for method, s in rows.items():
            cells = [f"{_fmt(s[k])} | {_fmt(s.get(k + '_sem'))} | "
                     f"{format_ci(s.get(k + '_ci_low'), s.get(k + '_ci_high'))}" for k in METRICS]
            lines.append(f"| {method} | {s['n']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def format_ci(low: float | None, high: float | None) -> str:
    """`[0.480, 0.545]`, or `–` where no interval could be estimated."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "–"
    return f"[{low:.3f}, {high:.3f}]"


def _fmt(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


# ---------------------------------------------------------------- curves


def resample(curve: Sequence[float], points: int = CURVE_POINTS) -> np.ndarray:
    """A curve on `points` equally spaced fractions of [0, 1] (runs may differ in frame count)."""
    y = np.asarray(curve, dtype=np.float64)
    if y.size == 1:
        return np.full(points, y[0])
    return np.interp(np.linspace(0, 1, points), np.linspace(0, 1, y.size), y)


def mean_curves(records: Sequence[ResultRow | Mapping[str, Any]],
                ) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """protocol -> method -> {"insertion": mean curve, "deletion": mean curve}."""
    found: dict[str, dict[str, dict[str, list[np.ndarray]]]] = {}
    for r in as_rows(records):
        for kind, curve in (("insertion", r.insertion_curve), ("deletion", r.deletion_curve)):
            if curve:
                per_method = found.setdefault(r.protocol, {})
                per_method.setdefault(r.method, {}).setdefault(kind, []).append(resample(curve))
    return {p: {m: {k: np.mean(v, axis=0) for k, v in kinds.items()} for m, kinds in methods.items()}
            for p, methods in found.items()}
