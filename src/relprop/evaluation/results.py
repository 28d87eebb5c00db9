"""The results of `relprop evaluate`: results.jsonl (one `ResultRow` a line), skipped.jsonl and
run.json read and written, the one `summarize` (mean ± std, ddof = 1) and the markdown table.

The evaluation, the report and detection all go through here, so that the same run prints the same
numbers wherever it is shown. `ResultRow` is the one spelling of a row: the evaluation writes
`ResultRow.to_dict()`, and everything that reads results.jsonl (resume, summary, report, compare)
reads `ResultRow`s through `read_rows`. Scores are read generically from `metrics.METRICS`: a metric
added there appears in the summary, the markdown and the report without an edit here.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import math
import os
import platform
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from relprop import __version__
from relprop.errors import BusyError, DiskFullError, InputError, RelpropError, first_line
from relprop.evaluation.metrics import LOCALIZATION, METRICS
from relprop.evaluation.protocols import DEFAULT_SEED, DEFAULT_TIES, PROTOCOL_SPECS, seeded
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
    def from_dict(cls, data: Any) -> Conservation:
        if not isinstance(data, Mapping):
            raise InputError(f"conservation is a {type(data).__name__}, not an object")
        output, input_ = _number(data.get("output"), "conservation.output"), \
            _number(data.get("input"), "conservation.input")
        if output is None or input_ is None:
            raise InputError("conservation has no output or input sum")
        return cls(output, input_, _number(data.get("last_block"), "conservation.last_block"),
                   _text(data.get("last_block_name"), "conservation.last_block_name"),
                   _number(data.get("first_block"), "conservation.first_block"),
                   _text(data.get("first_block_name"), "conservation.first_block_name"))


_ROW_FIELDS = ("checkpoint", "checkpoint_sha256", "image", "label", "pred", "method", "protocol",
               "channels", "insertion_curve", "deletion_curve", "localization", "conservation",
               "failure", "input", "ties", "seed")


def row_variant(protocol: str, ties: str, seed: int | None) -> str:
    """What besides (checkpoint, image, method, protocol) changes a row's scores: the tie mode,
    and the seed where it matters (random ties, ROAD's noise). Part of every row's key, so that
    rows of another mode or seed are never taken for done, nor averaged together."""
    return f"{ties}, seed {seed}" if seeded(protocol, ties) else ties


@dataclass(frozen=True, slots=True)
class ResultRow:
    """One (checkpoint, image, method, protocol) of `relprop evaluate`: one line of results.jsonl.

    `scores` holds one value per metric of `metrics.METRICS` (insertion, deletion, id, ...), written
    at the top level of the line; `localization` the box scores (pointing, energy, and the centre
    baselines) where the data has boxes; `conservation` the relevance totals of the LRP methods.
    `failure` says why a row has no scores (a NaN/Inf model output, map or score): such a row is
    done (a resume does not redo it) but enters no mean and no n. `input` is the image file's
    stamp (size and modification time) when it was scored: a row of a file replaced since counts
    no more. `ties` and `seed` say how tied pixels were ordered (and ROAD's noise drawn); rows
    written before they were recorded read as `reference` ties, with no seed.
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
    insertion_curve: Sequence[float] = field(default_factory=list)
    deletion_curve: Sequence[float] = field(default_factory=list)
    localization: dict[str, float | None] | None = None
    conservation: Conservation | None = None
    failure: str | None = None
    input: str | None = None
    ties: str = DEFAULT_TIES
    seed: int | None = None

    @property
    def variant(self) -> str:
        return row_variant(self.protocol, self.ties, self.seed)

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        """What identifies a row: a resumed run computes only the keys not yet in the files."""
        return self.checkpoint_sha256, self.image, self.method, self.protocol, self.variant

    def score(self, metric: str) -> float:
        """The metric's value, NaN where the row has none."""
        value = self.scores.get(metric)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan

    @property
    def problem(self) -> str | None:
        """Why the row has no usable scores (its recorded failure, or a metric that is missing,
        NaN or infinite), None for a scored row. Such rows are counted apart, never in an n."""
        if self.failure:
            return self.failure
        bad = [key for key in METRICS if not math.isfinite(self.score(key))]
        return f"no finite {', '.join(bad)}" if bad else None

    def to_dict(self) -> dict[str, Any]:
        """The line of results.jsonl (this layout is the results format; see docs/results.md)."""
        data = {
            "checkpoint": self.checkpoint, "checkpoint_sha256": self.checkpoint_sha256,
            "image": self.image, "label": self.label, "pred": self.pred, "method": self.method,
            "protocol": self.protocol, "channels": self.channels, **self.scores,
            "insertion_curve": list(self.insertion_curve),
            "deletion_curve": list(self.deletion_curve), "localization": self.localization,
            "conservation": None if self.conservation is None else self.conservation.to_dict(),
            "ties": self.ties, "seed": self.seed,
        }
        if self.failure is not None:
            data["failure"] = self.failure
        if self.input is not None:
            data["input"] = self.input
        return data

    @classmethod
    def from_dict(cls, data: Any) -> ResultRow:
        """A line of results.jsonl, checked field by field (one clear error, never a KeyError or
        TypeError later); every other key holding a number is a score."""
        if not isinstance(data, Mapping):
            raise InputError(f"a JSON {type(data).__name__}, not a result row of `relprop evaluate`")
        for key in ("image", "method", "protocol"):
            if not isinstance(data.get(key), str):
                raise InputError(f"no {key!r} text: not a result row of `relprop evaluate`")
        for key in METRICS:
            _number(data.get(key), key)
        localization = data.get("localization")
        if localization is not None:
            if not isinstance(localization, Mapping):
                raise InputError(f"localization is a {type(localization).__name__}, not an object")
            localization = {str(k): _number(v, f"localization.{k}") for k, v in localization.items()}
        conservation = data.get("conservation")
        return cls(
            image=data["image"], method=data["method"], protocol=data["protocol"],
            scores={k: v for k, v in data.items() if k not in _ROW_FIELDS and _is_number(v, True)},
            checkpoint=_text(data.get("checkpoint"), "checkpoint") or "",
            checkpoint_sha256=_text(data.get("checkpoint_sha256"), "checkpoint_sha256") or "",
            label=_integer(data.get("label"), "label"), pred=_integer(data.get("pred"), "pred"),
            channels=_text(data.get("channels"), "channels") or "sum",
            insertion_curve=_curve(data.get("insertion_curve"), "insertion_curve"),
            deletion_curve=_curve(data.get("deletion_curve"), "deletion_curve"),
            localization=localization,
            conservation=None if not conservation else Conservation.from_dict(conservation),
            failure=_text(data.get("failure"), "failure"), input=_text(data.get("input"), "input"),
            ties=_text(data.get("ties"), "ties") or DEFAULT_TIES, seed=_integer(data.get("seed"), "seed"),
        )


def _is_number(value: Any, or_none: bool = False) -> bool:
    return (value is None and or_none) or (isinstance(value, int | float) and not isinstance(value, bool))


def _number(value: Any, what: str) -> float | None:
    if not _is_number(value, or_none=True):
        raise InputError(f"{what} is {_shown(value)}, not a number")
    return None if value is None else float(value)


def _integer(value: Any, what: str) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise InputError(f"{what} is {_shown(value)}, not an integer")
    return value


def _text(value: Any, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InputError(f"{what} is {_shown(value)}, not text")
    return value


def _curve(value: Any, what: str) -> list[float]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_number(v) for v in value):
        raise InputError(f"{what} is not a list of numbers")
    return value


def _shown(value: Any) -> str:
    """A value in an error line: its type and a short, one-line repr."""
    text = repr(value).replace("\n", " ")
    return f"a {type(value).__name__} ({text[:40]}{'...' if len(text) > 40 else ''})"


def as_rows(records: Iterable[ResultRow | Mapping[str, Any]]) -> list[ResultRow]:
    """Rows, from rows or from their dict form (results.jsonl's lines)."""
    return [r if isinstance(r, ResultRow) else ResultRow.from_dict(r) for r in records]


@dataclass
class ReadCounts:
    """What a reader of the results left out, to be said beside its numbers."""

    duplicates: int = 0  # rows of a key already read (two writers, an old bug): counted once
    stale: int = 0  # rows of images not in the run's current inputs (removed or replaced)
    failed: int = 0  # unique rows with a failure or a non-finite score: in no mean and no n

    def notes(self) -> list[str]:
        """One sentence per kind of row left out (nothing when nothing was)."""
        notes = []
        if self.failed:
            notes.append(f"{self.failed} row(s) failed (NaN/Inf model output, map or score; their "
                         "`failure` says why): in no mean and no n")
        if self.duplicates:
            notes.append(f"{self.duplicates} duplicate row(s) ignored (each key counted once)")
        if self.stale:
            notes.append(f"{self.stale} row(s) of images no longer in the run's data ignored")
        return notes


def iter_rows(out: Path, *, repair: Path | None = None, canonical: Callable[[str], str] | None = None,
              inputs: Mapping[str, str] | None = None,
              counts: ReadCounts | None = None) -> Iterator[ResultRow]:
    """The rows of every results file in OUT (of every rank), streamed: the first of each key
    (method names compared through `canonical`), leaving out, and counting in `counts`, the
    duplicates and, given the run's `inputs` (image -> stamp), the rows of images no longer in
    it. Memory: one small digest per key. A malformed row is one error naming its file and line."""
    counts = counts if counts is not None else ReadCounts()
    seen: set[bytes] = set()
    for path in shard_files(out, "results"):
        for number, record in iter_jsonl(path, repair=path == repair, on_partial=_report_partial):
            try:
                row = ResultRow.from_dict(record)
            except InputError as error:
                raise InputError(f"{path}:{number}: {error}") from None
            if inputs is not None and (row.image not in inputs or
                                       row.input not in (None, inputs[row.image])):
                counts.stale += 1
                continue
            method = canonical(row.method) if canonical is not None else row.method
            digest = hashlib.blake2b(json.dumps([row.checkpoint_sha256, row.image, method,
                                                 row.protocol, row.variant]).encode(),
                                     digest_size=16).digest()
            if digest in seen:
                counts.duplicates += 1
                continue
            seen.add(digest)
            if row.problem is not None:
                counts.failed += 1
            yield row


def read_rows(out: Path, *, repair: Path | None = None, canonical: Callable[[str], str] | None = None,
              inputs: Mapping[str, str] | None = None,
              counts: ReadCounts | None = None) -> list[ResultRow]:
    """The rows of every results file in OUT, as `iter_rows` streams them, in a list."""
    return list(iter_rows(out, repair=repair, canonical=canonical, inputs=inputs, counts=counts))


@dataclass
class RunRows:
    """One streamed pass over a run's results: the rows without their curves (the curves are
    summed on the way; failed rows are kept for their count), and what was left out. Memory grows
    with a few numbers a row, not with the curves or the file."""

    rows: list[ResultRow]
    curves: CurveSums
    counts: ReadCounts


_NO_CURVE: tuple[float, ...] = ()


def load_rows(out: Path, *, rename: Callable[[str], str] | None = None, **options: Any) -> RunRows:
    """`iter_rows(out, **options)` in one pass: rows kept without their curves (their repeated
    names shared), curves summed; `rename` spells each method as the caller does."""
    counts, curves, rows = options.pop("counts", None) or ReadCounts(), CurveSums(), []
    for row in iter_rows(out, counts=counts, **options):
        if rename is not None:
            row = replace(row, method=rename(row.method))
        curves.add(row)
        rows.append(replace(
            row, insertion_curve=_NO_CURVE, deletion_curve=_NO_CURVE,
            checkpoint=sys.intern(row.checkpoint), checkpoint_sha256=sys.intern(row.checkpoint_sha256),
            method=sys.intern(row.method), protocol=sys.intern(row.protocol),
            channels=sys.intern(row.channels), ties=sys.intern(row.ties)))
    return RunRows(rows, curves, counts)


def scored(records: Iterable[ResultRow]) -> list[ResultRow]:
    """The rows with finite scores (the others are failures, counted apart)."""
    return [r for r in records if r.problem is None]


# ---------------------------------------------------------------- files


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write of `path` into one line: a full disk (or a file-size limit) says what
    to do; what was on disk before is intact (every write is atomic or cut back)."""
    try:
        yield
    except OSError as error:
        if isinstance(error, RelpropError):
            raise
        if error.errno in DISK_FULL:
            raise DiskFullError(f"no space left on device writing {path}; free space and rerun the "
                                "same command to resume (nothing written before is lost)") from None
        raise InputError(f"cannot write {path} ({error.strerror or type(error).__name__})") from None


def write_atomic(path: Path, data: bytes | str | Callable[[Path], Any]) -> None:
    """Write `path` whole or not at all: into a temporary file in the same folder (same suffix,
    so writers that go by it still do), fsync, rename over `path`, fsync the folder. A kill or a
    full disk leaves the old file (or none), never a cut one. `data` is the bytes, the text, or
    a function that writes the file at the path it is given."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    with writing(path):
        try:
            if callable(data):
                data(temporary)
            else:
                temporary.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
            fd = os.open(temporary, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _sync_folder(path.parent)


TEMPORARY = ".*.tmp*"  # the names `write_atomic` writes to before the rename


def remove_temporaries(out: Path) -> int:
    """Delete the temporary files that killed writers left in OUT and its maps (call it holding
    the folder's lock, so that no live writer owns one); returns how many."""
    found = [*Path(out).glob(TEMPORARY), *(Path(out) / "maps").rglob(TEMPORARY)]
    for path in found:
        path.unlink(missing_ok=True)
    return len(found)


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename in it survives a power cut (where the OS allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def save_map(path: Path, heat: np.ndarray) -> None:
    """A map as .npy, atomically: a map file that exists is complete."""
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # numpy's own file writes lose the errno of a full disk
    np.save(buffer, heat.astype(np.float32))
    write_atomic(path, buffer.getvalue())


def map_is_whole(path: Path) -> bool:
    """The map file exists and its header and data are all there (a cut one is written again)."""
    try:
        np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return True


def iter_jsonl(path: Path, *, repair: bool = False,
               on_partial: Callable[[Path], None] | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) of a .jsonl file, streamed one line at a time.

    A last line cut by a kill (no newline, or not JSON) is dropped (and `on_partial` told), and
    with `repair` cut from the file by `os.truncate` at the end of the last whole line: the file
    is never rewritten, so a kill during the repair loses nothing. A bad line in the middle is
    one clear error.
    """
    if not path.is_file():
        return
    end_of_good, bad, partial = 0, None, False
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if bad is not None:
                raise InputError(f"{path}:{bad}: not a JSON line")
            if not line.endswith(b"\n"):
                partial = bool(line.strip())
                break
            if line.strip():
                try:
                    value = json.loads(line)
                except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep
                    bad = number
                    continue
                yield number, value
            end_of_good += len(line)
    partial = partial or bad is not None  # a bad last line: written by a run that was killed
    if partial and on_partial is not None:
        on_partial(path)
    if partial and repair:
        with writing(path):
            os.truncate(path, end_of_good)


def read_jsonl(path: Path, *, repair: bool = False,
               on_partial: Callable[[Path], None] | None = None) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, one a line (see `iter_jsonl`)."""
    return [value for _, value in iter_jsonl(path, repair=repair, on_partial=on_partial)
            if isinstance(value, dict)]


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One whole line in one write, flushed and synced: a kill -9 at any moment leaves either the
    full line or none of it on disk (a reader still drops a cut last line, see `iter_jsonl`); a
    write that fails (full disk) is cut back to where the file ended."""
    data = (json.dumps(record) + "\n").encode("utf-8")
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                written = os.write(fd, data)
                while written < len(data):  # a short write (full disk, signal): finish the line
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            except OSError:
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass  # the cut line is dropped by the next reader
                raise
        finally:
            os.close(fd)


# ---------------------------------------------------------------- one writer per folder


LOCK_NAME = "evaluate.lock"


class RunLock:
    """The advisory lock (`fcntl.flock`) of one output folder, held while a run writes there
    (by rank 0 of a sharded run, for all its ranks). The file says who holds it; the kernel drops
    the lock when the holder exits, however it ends, so a killed run never leaves a stale lock."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_NAME
        with writing(self.path):
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(self.path)
            for _ in range(20):  # the holder writes who it is just after it takes the lock
                if holder != UNKNOWN_HOLDER:
                    break
                time.sleep(0.05)
                holder = _holder(self.path)
            os.close(self._fd)
            self._fd = None
            raise BusyError(f"{Path(out)} is in use by another relprop evaluate ({holder}); wait "
                            "for it to end, or choose another --out") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        with writing(self.path):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (json.dumps(me) + "\n").encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


UNKNOWN_HOLDER = "holder unknown"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
        return f"pid {int(info['pid'])} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return UNKNOWN_HOLDER


# ---------------------------------------------------------------- several writers (ranks)


def rank_file(out: Path, stem: str, rank: int, world: int) -> Path:
    """The file one process appends to: `results.jsonl` alone, `results.rank{r}.jsonl` when
    sharded. Readers take the union of all of them, so a resumed run may use another world
    size: no file is ever written by two processes at once."""
    return out / (f"{stem}.jsonl" if world == 1 else f"{stem}.rank{rank}.jsonl")


def shard_files(out: Path, stem: str) -> list[Path]:
    """Every file of `stem` in OUT: the single-process one, then the ranks' in rank order."""
    # ASCII digits only: str.isdigit also takes '²', which int() refuses
    ranked = [p for p in out.glob(f"{stem}.rank*.jsonl") if re.fullmatch(r"[0-9]+", p.name[len(stem) + 5:-6])]
    ranked.sort(key=lambda p: int(p.name[len(stem) + 5:-6]))
    single = out / f"{stem}.jsonl"
    return ([single] if single.is_file() else []) + ranked


def skipped_key(record: Mapping[str, Any]) -> tuple[str, str]:
    """A line of skipped.jsonl ({"checkpoint_sha256", "image", "error"}) counts once per
    checkpoint and image: what the evaluation and the report both key it by."""
    return str(record.get("checkpoint_sha256") or ""), str(record.get("image"))


def read_union(out: Path, stem: str, key: Callable[[dict[str, Any]], Any], *,
               repair: Path | None = None) -> list[dict[str, Any]]:
    """The records (JSON objects) of every shard file of `stem` (first of each `key` kept), a cut
    last line of any of them named on stderr and ignored; only the file `repair` (this process's
    own) is cut back, as no other process appends to it."""
    seen: set[Any] = set()
    records: list[dict[str, Any]] = []
    for path in shard_files(out, stem):
        for _, record in iter_jsonl(path, repair=path == repair, on_partial=_report_partial):
            if not isinstance(record, dict):
                continue
            k = key(record)
            if k not in seen:
                seen.add(k)
                records.append(record)
    return records


def _report_partial(path: Path) -> None:
    print(f"relprop: {path}: ignored a partial last line (a run killed while writing it); "
          "that row is computed again on resume", file=sys.stderr)


# ---------------------------------------------------------------- run.json


def read_run_info(path: Path) -> dict[str, Any]:
    """run.json as a dict ({} when absent); one clear error when it is not JSON or not a run's."""
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:
        reason = "nested too deep" if isinstance(error, RecursionError) else first_line(error)
        raise InputError(f"{path}: not valid JSON ({reason})") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read it ({error.strerror})") from None
    if not isinstance(info, dict):
        raise InputError(f"{path}: not the run.json of `relprop evaluate` (a JSON "
                         f"{type(info).__name__}, not an object)")
    for key, kind in (("settings", dict), ("resumed", list), ("labels", dict), ("inputs", dict)):
        if key in info and not isinstance(info[key], kind):
            raise InputError(f"{path}: not the run.json of `relprop evaluate` ({key!r} is a "
                             f"{type(info[key]).__name__})")
    return info


def write_run_info(path: Path, info: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(info, indent=2) + "\n")


def run_inputs(info: Mapping[str, Any]) -> dict[str, str] | None:
    """The image -> stamp map run.json records (None for a run from before it was recorded)."""
    images = (info.get("inputs") or {}).get("images")
    if not isinstance(images, dict) or not all(isinstance(v, str) for v in images.values()):
        return None
    return images


def inputs_record(images: Mapping[str, str]) -> dict[str, Any]:
    """run.json's `inputs`: the number of images, one hash of their names, sizes and times, and
    each image's stamp."""
    digest = hashlib.sha256()
    for name in sorted(images):
        digest.update(f"{name}\0{images[name]}\n".encode("utf-8", "surrogateescape"))
    return {"count": len(images), "sha256": digest.hexdigest(), "images": dict(sorted(images.items()))}


EXTENDABLE = ("data", "limit", "per_class")  # what --extend may change: which images are run
# what a run.json written before these settings existed meant (so that such a run resumes)
SETTING_DEFAULTS = {"ties": DEFAULT_TIES, "seed": DEFAULT_SEED}


def check_resume(path: Path, settings: dict[str, Any], canonical: Callable[[str], str],
                 images: Mapping[str, str] | None = None, extend: bool = False) -> None:
    """Write provenance on the first run; refuse to resume under different settings or on other
    images (unless `extend`: then the run's images become these), and note each resumption (with
    its versions) in run.json. Method names compare through `canonical`, so a run written under an
    alias (`ours`) resumes under the registry's name and back."""
    inputs = None if images is None else inputs_record(images)
    if not path.is_file():
        write_run_info(path, {"settings": settings, **({"inputs": inputs} if inputs else {}),
                              **provenance()})
        return
    run_info = read_run_info(path)
    previous = {**SETTING_DEFAULTS, **run_info.get("settings", {})}
    changed = [k for k in settings
               if _comparable(k, previous.get(k), canonical) != _comparable(k, settings[k], canonical)
               and not (extend and k in EXTENDABLE)]
    if changed:
        key = changed[0]
        hint = " (or --extend to run it on these images)" if key in EXTENDABLE else ""
        raise InputError(
            f"{path.parent} holds a run with different settings ({key}: {previous.get(key)!r} "
            f"now {settings[key]!r}); rerun with the same options to resume{hint}, or use a new --out"
        )
    before = run_inputs(run_info)
    if inputs is not None and before is not None and before != inputs["images"] and not extend:
        raise InputError(f"{path.parent} holds a run on other images: {_difference(before, images)} "
                         "since it began; rerun on the same images to resume, pass --extend to go "
                         "on with these (rows of removed or changed images then count no more), "
                         "or use a new --out")
    run_info["settings"] = settings
    if inputs is not None:
        run_info["inputs"] = inputs
    run_info.setdefault("resumed", []).append(provenance())
    write_run_info(path, run_info)


def _difference(before: Mapping[str, str], now: Mapping[str, str]) -> str:
    """`2 added, 1 removed, 1 changed (e.g. a/b.jpg changed)`."""
    kinds = {"added": sorted(set(now) - set(before)), "removed": sorted(set(before) - set(now)),
             "changed": sorted(k for k in set(now) & set(before) if now[k] != before[k])}
    found = [(kind, names) for kind, names in kinds.items() if names]
    text = ", ".join(f"{len(names)} {kind}" for kind, names in found)
    kind, names = found[0]
    return f"{text} (e.g. {names[0]} {kind})"


def _comparable(key: str, value: Any, canonical: Callable[[str], str]) -> Any:
    if key == "methods" and isinstance(value, list):
        value = [canonical(str(v)) for v in value]
    if key in UNORDERED_SETTINGS and isinstance(value, list):
        return sorted(value, key=str)
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


def summarize(records: Iterable[ResultRow | Mapping[str, Any]], methods: Sequence[str],
              protocols: Sequence[str]) -> dict[str, Any]:
    """{method: {insertion, deletion, id (first protocol), *_std, n, failed, ..., protocols: {p: {...}}}}.

    One checkpoint: mean and std over images. Several: mean and std over per-checkpoint means.
    Rows that failed (a recorded failure, or a score that is missing, NaN or infinite) enter no
    mean and no n: `failed` counts them. Rows are taken in (checkpoint, image) order, so the
    numbers (the bootstrap CIs included) do not depend on which process wrote which row, or in
    what order.
    """
    groups: dict[tuple[str, str], list[ResultRow]] = {}
    failed: dict[tuple[str, str], int] = {}
    variants: dict[tuple[str, str], ResultRow] = {}
    for row in records:
        row = row if isinstance(row, ResultRow) else ResultRow.from_dict(row)
        key = (row.method, row.protocol)
        first = variants.setdefault(key, row)
        if first.variant != row.variant:
            raise InputError(f"the results of {row.method} in protocol {row.protocol} mix tie modes "
                             f"or seeds ({first.variant}; {row.variant}): summarize each apart")
        if row.problem is not None:
            failed[key] = failed.get(key, 0) + 1
        else:
            groups.setdefault(key, []).append(row)
    summary: dict[str, Any] = {}
    for method in methods:
        per_protocol = {}
        for protocol in protocols:
            key = (method, protocol)
            if key in groups or key in failed:
                rows = sorted(groups.get(key, []), key=lambda r: (r.checkpoint_sha256, r.image))
                per_protocol[protocol] = {**_aggregate(rows), "failed": failed.get(key, 0),
                                          **_ties(variants[key])}
        if per_protocol:
            first = per_protocol[next(iter(per_protocol))]
            summary[method] = {**first, "protocol": next(iter(per_protocol)), "protocols": per_protocol}
    return summary


def _ties(row: ResultRow) -> dict[str, Any]:
    """The tie mode of a group's rows and its seed (None where the seed changes no score)."""
    return {"ties": row.ties, "seed": row.seed if seeded(row.protocol, row.ties) else None}


def ties_text(stats: Mapping[str, Any]) -> str:
    """`ties random, seed 0` for a summary's heading (`reference` ties before they were recorded)."""
    ties, seed = stats.get("ties") or DEFAULT_TIES, stats.get("seed")
    return f"ties {ties}" + (f", seed {seed}" if seed is not None else "")


def titles(protocol: str) -> dict[str, str]:
    """The metrics' titles in this protocol's tables (ROAD's curves are LeRF and MoRF)."""
    spec = PROTOCOL_SPECS.get(protocol)
    return {key: (spec.titles.get(key) if spec else None) or metric.title
            for key, metric in METRICS.items()}


def _aggregate(rows: Sequence[ResultRow]) -> dict[str, Any]:
    by_checkpoint: dict[str, list[ResultRow]] = {}
    for row in rows:
        by_checkpoint.setdefault(row.checkpoint_sha256, []).append(row)
    means = [_means(group) for group in by_checkpoint.values()]
    if len(means) <= 1:
        stats = _means(rows, with_std=True)
        stats.update(_uncertainty({key: [r.score(key) for r in rows] for key in METRICS},
                                  bootstrap=True))
    else:  # the paper's seed table: spread of the per-checkpoint means
        stats = {}
        for key in means[0]:
            values = [m[key] for m in means if m[key] is not None]
            stats[key] = float(np.mean(values)) if values else None
            if key in METRICS:
                stats[key], stats[f"{key}_std"] = mean_std(values)
        stats.update(_uncertainty({key: [m[key] for m in means] for key in METRICS}, bootstrap=False))
    stats["n"] = len(rows) if len(means) <= 1 else min(len(g) for g in by_checkpoint.values())
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
        mean, std = mean_std([r.score(key) for r in rows])
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


def summary_markdown(summary: dict[str, Any], protocols: Sequence[str],
                     notes: Sequence[str] = ()) -> str:
    """The paper's table layout (Insertion up, Deletion down, ID up), one table per protocol;
    `notes` (rows left out, see `ReadCounts.notes`) first."""
    lines = [f"*{note}.*" for note in notes] + ([""] if notes else [])
    for protocol in protocols:
        rows = {m: s["protocols"][protocol] for m, s in summary.items() if protocol in s["protocols"]}
        if not rows:
            continue
        named = titles(protocol)
        header = " | ".join(f"{named[k]} {m.arrow}" for k, m in METRICS.items())
        first = next(iter(rows.values()))
        over = (f"mean ± std over {first['checkpoints']} checkpoints (per-checkpoint means)"
                if first["checkpoints"] > 1 else "mean ± std over images")
        lines += [f"## Protocol `{protocol}`, {ties_text(first)} ({over})", "",
                  f"| Method | {header} | n | Pointing ↑ | Energy ↑ | In/Out |",
                  "|---|" + "---|" * len(METRICS) + "---|---|---|---|"]
        for method, s in rows.items():
            cells = [format_mean_std(s[k], s[k + "_std"]) for k in METRICS]
            extra = [_fmt(s.get("pointing")), _fmt(s.get("energy")), _fmt(s.get("conservation"))]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {_n(s)} | " + " | ".join(extra) + " |")
        centre = next((s for s in rows.values() if s.get("centre_pointing") is not None), None)
        if centre is not None:
            lines.append(f"| *centre-point baseline* |{' |' * len(METRICS)} | "
                         f"{_fmt(centre['centre_pointing'])} | {_fmt(centre['centre_energy'])} | |")
        lines.append("")
    return "\n".join(lines)


def _n(stats: Mapping[str, Any]) -> str:
    """The n cell: the rows in the mean, and the failed ones beside them (`3 (+1 failed)`)."""
    failed = stats.get("failed") or 0
    return f"{stats['n']} (+{failed} failed)" if failed else str(stats["n"])


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
        named, first = titles(protocol), next(iter(rows.values()))
        lines += [f"## Protocol `{protocol}`, {ties_text(first)}: uncertainty ({over})", "",
                  "| Method | n | " + " | ".join(f"{named[k]} {m.arrow} mean | SE | 95 % CI"
                                               for k, m in METRICS.items()) + " |",
                  "|---|---|" + "---|---|---|" * len(METRICS)]
        for method, s in rows.items():
            cells = [f"{_fmt(s[k])} | {_fmt(s.get(k + '_sem'))} | "
                     f"{format_ci(s.get(k + '_ci_low'), s.get(k + '_ci_high'))}" for k in METRICS]
            lines.append(f"| {method} | {_n(s)} | " + " | ".join(cells) + " |")
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


class CurveSums:
    """Mean insertion and deletion curves kept as running sums (memory: one curve per method,
    protocol and kind, whatever the number of rows); failed rows are left out."""

    def __init__(self) -> None:
        self._sums: dict[tuple[str, str, str], list[Any]] = {}

    def add(self, row: ResultRow) -> None:
        if row.problem is not None:
            return
        for kind, curve in (("insertion", row.insertion_curve), ("deletion", row.deletion_curve)):
            if curve:
                entry = self._sums.setdefault((row.protocol, row.method, kind),
                                              [np.zeros(CURVE_POINTS), 0])
                entry[0] += resample(curve)
                entry[1] += 1

    def means(self) -> dict[str, dict[str, dict[str, np.ndarray]]]:
        """protocol -> method -> {"insertion": mean curve, "deletion": mean curve}."""
        found: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        for (protocol, method, kind), (total, count) in self._sums.items():
            found.setdefault(protocol, {}).setdefault(method, {})[kind] = total / count
        return found


def mean_curves(records: Iterable[ResultRow | Mapping[str, Any]],
                ) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """protocol -> method -> {"insertion": mean curve, "deletion": mean curve}."""
    sums = CurveSums()
    for r in records:
        sums.add(r if isinstance(r, ResultRow) else ResultRow.from_dict(r))
    return sums.means()
