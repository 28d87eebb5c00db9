"""The results of `relprop evaluate`: results.jsonl, skipped.jsonl and run.json read and written,
the one `summarize` (mean ± std, ddof = 1) and the markdown table.

The evaluation, the report and detection all go through here, so that the same run prints the same
numbers wherever it is shown. Scores are read generically from `metrics.METRICS`: a metric added
there appears in the summary, the markdown and the report without an edit here.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
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


def summarize(records: Sequence[dict[str, Any]], methods: Sequence[str],
              protocols: Sequence[str]) -> dict[str, Any]:
    """{method: {insertion, deletion, id (first protocol), *_std, n, ..., protocols: {p: {...}}}}.

    One checkpoint: mean and std over images. Several: mean and std over per-checkpoint means.
    Rows are taken in (checkpoint, image) order, so the numbers (the bootstrap CIs included) do
    not depend on which process wrote which row, or in what order.
    """
    records = sorted(records, key=lambda r: (str(r["checkpoint_sha256"]), str(r["image"])))
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
        stats.update(_uncertainty({key: [r[key] for r in rows] for key in METRICS}, bootstrap=True))
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


def _means(rows: Sequence[dict[str, Any]], with_std: bool = False) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for key in METRICS:
        mean, std = mean_std([r[key] for r in rows])
        stats[key] = mean
        if with_std:
            stats[f"{key}_std"] = std
    for key in LOCALIZATION:
        values = [r["localization"][key] for r in rows
                  if r.get("localization") and r["localization"].get(key) is not None]
        stats[key] = float(np.mean(values)) if values else None
    ratios = [r["conservation"]["input_over_output"] for r in rows
              if r.get("conservation") and r["conservation"].get("input_over_output") is not None]
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


def mean_curves(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """protocol -> method -> {"insertion": mean curve, "deletion": mean curve}."""
    found: dict[str, dict[str, dict[str, list[np.ndarray]]]] = {}
    for r in records:
        for kind in ("insertion", "deletion"):
            curve = r.get(f"{kind}_curve")
            if isinstance(curve, list) and curve:
                per_method = found.setdefault(str(r.get("protocol", "")), {})
                per_method.setdefault(str(r.get("method")), {}).setdefault(kind, []).append(resample(curve))
    return {p: {m: {k: np.mean(v, axis=0) for k, v in kinds.items()} for m, kinds in methods.items()}
            for p, methods in found.items()}
