"""What a `relprop evaluate` run folder promises, in one process on three tin10 images: files are
replaced whole or appended (a torn line is cut in place), one run writes a folder at a time, a
run knows its images, NaN/Inf is a failure and never a number, every reader (summary, compare,
report) counts each key once and agrees on n, and hostile files give one line.

Fault injection (kill -9, full disk, two processes) is in test_fault_injection.py."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from relprop.cli.main import main
from relprop.evaluation import results
from relprop.evaluation.results import ResultRow, summarize

from sharedfiles import copy_tin10_val, shared_path

IMAGES = {"n01443537": ["val_1230.JPEG", "val_1284.JPEG"], "n01882714": ["val_1083.JPEG"]}
METHODS = "gradient,ours"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return copy_tin10_val(tmp_path_factory.mktemp("data"), IMAGES)


def _args(data, out, *extra, methods=METHODS):
    return ["evaluate", "--weights", str(shared_path("models", "resnet18_tin10.pt")),
            "--data", str(data), "--methods", methods, "--step", "6000", "--batch-size", "2",
            "--device", "cpu", "--out", str(out), *extra]


def _lines(out: Path) -> list[str]:
    return (out / "results.jsonl").read_text().splitlines()


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    assert main(_args(dataset, out, "--save-maps")) == 0
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _n(summary_md: str, method: str) -> str:
    """The n cell of `method` in summary.md's first table."""
    line = next(line for line in summary_md.splitlines() if line.startswith(f"| {method} |"))
    return line.split(" | ")[4]


# ---------------------------------------------------------------- append-only, atomic


def test_a_torn_last_line_is_cut_in_place_never_rewritten(tmp_path, monkeypatch):
    rows = [{"image": f"{i}.png", "method": "m", "protocol": "paper", "id": 0.5} for i in range(50)]
    whole = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path = tmp_path / "results.jsonl"
    path.write_bytes(whole + b'{"image": "cut')
    inode = path.stat().st_ino

    def refuse(*args, **kwargs):
        raise AssertionError("the results file was rewritten")

    monkeypatch.setattr(Path, "write_bytes", refuse)
    monkeypatch.setattr(Path, "write_text", refuse)
    found = results.read_rows(tmp_path, repair=path)
    assert [r.image for r in found] == [r["image"] for r in rows]
    assert path.read_bytes() == whole and path.stat().st_ino == inode


def test_run_json_summaries_and_maps_are_replaced_whole(dataset, tmp_path, monkeypatch):
    replaced = []
    real = os.replace

    def spy(source, target, *args, **kwargs):
        replaced.append(Path(target).name)
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", spy)
    assert main(_args(dataset, tmp_path, "--save-maps", methods="gradient")) == 0
    assert {"run.json", "summary.json", "summary.md", "curves_paper.png",
            "val_1230.npy", "val_1284.npy", "val_1083.npy"} <= set(replaced)
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary file left behind


def test_a_cut_or_empty_map_is_written_again_on_resume_and_the_report_survives_it(
        finished, dataset, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    empty, cut = out / "maps" / "gradient" / "val_1230.npy", out / "maps" / "ours" / "val_1083.npy"
    whole = {p: p.read_bytes() for p in (empty, cut)}
    report = tmp_path / "report"
    empty.write_bytes(b"")
    assert main(["report", str(out), "--out", str(report)]) == 0  # was EOFError
    cut.write_bytes(whole[cut][: len(whole[cut]) // 2])
    rows = _lines(out)
    assert main(_args(dataset, out, "--save-maps")) == 0
    assert _lines(out) == rows  # no row recomputed
    for path, data in whole.items():
        np.testing.assert_array_equal(np.load(path), np.load(_write(tmp_path / "ref.npy", data)))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- one writer, each key once


def test_a_second_run_on_a_held_folder_is_one_line_naming_the_holder(finished, dataset, tmp_path,
                                                                     capsys):
    out = _copy(finished, tmp_path)
    before = (out / "results.jsonl").read_bytes()
    with results.RunLock(out):
        assert main(_args(dataset, out)) == 1
    err = capsys.readouterr().err
    assert f"is in use by another relprop evaluate (pid {os.getpid()} on " in err
    assert err.count("\n") == 1 and "started 20" in err
    assert (out / "results.jsonl").read_bytes() == before
    assert main(_args(dataset, out)) == 0  # released: the same command goes on


def test_duplicate_rows_count_once_in_summary_compare_and_report(finished, dataset, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    lines = _lines(out)
    doubled = [json.dumps({**json.loads(line), "method": "lrp-split"}) if '"ours"' in line else line
               for line in lines]  # the same rows again, `ours` under its registry name
    with open(out / "results.jsonl", "a") as handle:
        handle.write("\n".join(doubled) + "\n")
    assert main(_args(dataset, out)) == 0
    capsys.readouterr()
    summary_md = (out / "summary.md").read_text()
    assert _n(summary_md, "gradient") == _n(summary_md, "ours") == "3"
    assert f"{len(lines)} duplicate row(s) ignored" in summary_md
    assert json.loads((out / "summary.json").read_text())["ours"]["n"] == 3
    assert main(["compare", str(out), "--baseline", "gradient"]) == 0
    captured = capsys.readouterr()
    assert "| ours | 3 |" in captured.out
    assert f"{len(lines)} duplicate row(s) ignored" in captured.err
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert f"{len(lines)} duplicate row(s) ignored" in page
    assert page.count('<td data-value="3">3</td>') == 2  # the images column, one per method


# ---------------------------------------------------------------- a run knows its images


def _data(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    return copy_tin10_val(tmp_path / "data", {**IMAGES, "n02056570": ["val_6457.JPEG"]})


def test_a_resume_on_other_images_is_refused_unless_extended(tmp_path, capsys):
    data, out = _data(tmp_path), tmp_path / "out"
    assert main(_args(data, out, methods="gradient")) == 0
    removed = data / "n01443537" / "val_1284.JPEG"
    removed.unlink()
    replaced = data / "n01882714" / "val_1083.JPEG"
    replaced.write_bytes((data / "n01443537" / "val_1230.JPEG").read_bytes())  # another picture
    capsys.readouterr()
    before = (out / "results.jsonl").read_bytes()
    assert main(_args(data, out, methods="gradient")) == 1
    err = capsys.readouterr().err
    assert "holds a run on other images: 1 removed, 1 changed" in err and err.count("\n") == 1
    assert (out / "results.jsonl").read_bytes() == before

    assert main(_args(data, out, "--extend", methods="gradient")) == 0
    fresh = tmp_path / "fresh"
    assert main(_args(data, fresh, methods="gradient")) == 0
    extended, reference = (json.loads((o / "summary.json").read_text())["gradient"]
                           for o in (out, fresh))
    assert extended["n"] == reference["n"] == 3  # the removed image is not counted
    assert extended["id"] == pytest.approx(reference["id"], abs=1e-6)  # the replaced one rescored
    assert "row(s) of images no longer in the run's data ignored" in (out / "summary.md").read_text()


def test_limit_keeps_its_n_when_the_folder_grows(tmp_path):
    data, out = _data(tmp_path), tmp_path / "out"
    assert main(_args(data, out, "--limit", "2", methods="gradient")) == 0
    shutil.copy(data / "n02056570" / "val_6457.JPEG", data / "n01443537" / "val_0000.JPEG")
    assert main(_args(data, out, "--limit", "2", methods="gradient")) == 1  # other images now
    assert main(_args(data, out, "--limit", "2", "--extend", methods="gradient")) == 0
    assert json.loads((out / "summary.json").read_text())["gradient"]["n"] == 2


# ---------------------------------------------------------------- non-finite is an error


class _NaNOnBlack(torch.nn.Module):
    """The model, but NaN wherever a pixel is black (as in the frames of the paper protocol)."""

    def __init__(self, model, black):
        super().__init__()
        self.model, self.black = model, black

    def forward(self, x):
        out = self.model(x)
        hit = ((x - self.black).abs() < 1e-4).all(dim=1).flatten(1).any(dim=1)
        return torch.where(hit[:, None], torch.full_like(out, float("nan")), out)


class _NaNOut(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) * float("nan")


@pytest.mark.parametrize("broken", ["frames", "output"])
def test_a_nan_model_is_a_recorded_failure_never_a_score(dataset, tmp_path, broken):
    from relprop.evaluation.classification import Checkpoint, EvalConfig, evaluate
    from relprop.models import load_model

    model, info = load_model(shared_path("models", "resnet18_tin10.pt"))
    black = (-torch.tensor(info.mean) / torch.tensor(info.std)).view(1, 3, 1, 1)
    wrapped = _NaNOnBlack(model, black) if broken == "frames" else _NaNOut(model)
    config = EvalConfig(data=dataset, out=tmp_path, methods=("gradient",), step=6000, batch_size=2)
    outcome = evaluate(config, [Checkpoint.of(wrapped.eval(), info)])
    rows = [json.loads(line) for line in _lines(tmp_path)]
    assert [r["id"] for r in rows] == [None] * 3  # was 0.0: NaN probabilities became 0
    reason = "NaN or infinite" if broken == "frames" else "model's output is NaN"
    assert all(reason in r["failure"] for r in rows)
    assert outcome.failed_rows == 3
    summary = json.loads((tmp_path / "summary.json").read_text())["gradient"]
    assert summary["n"] == 0 and summary["failed"] == 3
    assert "| 0 (+3 failed) |" in (tmp_path / "summary.md").read_text()


def test_null_and_nan_scores_are_out_of_every_n(finished, tmp_path, capsys):
    """summary.md, summary.json, the report and compare give one n (the issue: 4, 4 and 3)."""
    out = _copy(finished, tmp_path)
    lines = [json.loads(line) for line in _lines(out)]
    first = next(r for r in lines if r["method"] == "gradient")
    first["id"] = None
    second = next(r for r in lines if r["method"] == "gradient" and r is not first)
    second["insertion"] = float("nan")
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    stats = summarize(results.read_rows(out), ["gradient"], ["paper"])["gradient"]
    assert (stats["n"], stats["failed"]) == (1, 2)
    assert main(["compare", str(out), "--baseline", "ours"]) == 0
    assert "| gradient | 1 |" in capsys.readouterr().out
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "2 row(s) failed" in page
    assert '<td data-value="1">1</td>' in page and '<td data-value="3">3</td>' in page


# ---------------------------------------------------------------- hostile files: one line


HOSTILE_ROWS = {
    "missing key": lambda r: {k: v for k, v in r.items() if k != "method"},
    "another tool": lambda r: {"name": "x", "value": 3},
    "score as text": lambda r: {**r, "insertion": "0.5"},
    "curve of text": lambda r: {**r, "insertion_curve": "0.1,0.2"},
    "conservation list": lambda r: {**r, "conservation": [1, 2]},
    "a JSON list": lambda r: [r],
}


@pytest.mark.parametrize("kind", HOSTILE_ROWS)
def test_hostile_rows_are_one_line_in_every_reader(finished, dataset, tmp_path, capsys, kind):
    out = _copy(finished, tmp_path)
    lines = _lines(out)
    lines[1] = json.dumps(HOSTILE_ROWS[kind](json.loads(lines[1])))
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    for argv in (["compare", str(out), "--baseline", "gradient"],
                 ["report", str(out), "--out", str(tmp_path / "report")], _args(dataset, out)):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "results.jsonl:2: " in err and err.count("\n") == 1, err


@pytest.mark.parametrize("content", [b"[" * 100_000 + b"]" * 100_000, b"", b'{"settings": [1]}',
                                     b'{"resumed": {}}', b"[1, 2]", b'{"settings": {"data": "x"'])
def test_hostile_run_records_are_one_line(finished, dataset, tmp_path, capsys, content):
    out = _copy(finished, tmp_path)
    (out / "run.json").write_bytes(content)
    capsys.readouterr()
    for argv in (["report", str(out), "--out", str(tmp_path / "report")], _args(dataset, out)):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "run.json" in err and err.count("\n") == 1, err


# ---------------------------------------------------------------- distributed environment


def test_rank_variables_without_a_master_are_one_line(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert main(_args(dataset, tmp_path)) == 1
    err = capsys.readouterr().err
    assert "MASTER_ADDR and MASTER_PORT not: leftover torchrun variables?" in err
    assert err.count("\n") == 1


def test_a_job_nobody_joins_fails_fast_on_one_line(dataset, tmp_path, monkeypatch, capsys):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(port)), ("RELPROP_DIST_JOIN_TIMEOUT", "2")):
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    assert main(_args(dataset, tmp_path)) == 1
    assert time.monotonic() - started < 60
    err = capsys.readouterr().err
    assert f"rank 1 of 2 could not join the job at 127.0.0.1:{port} within 2 s" in err
    assert err.count("\n") == 1


# ---------------------------------------------------------------- bounded


def _synthetic(path: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w") as handle:
        for i in range(rows):
            curves = rng.random((2, 101)).round(6).tolist()
            handle.write(json.dumps({
                "checkpoint_sha256": "ab" * 32, "image": f"c/{i // 2:06d}.png", "label": 0, "pred": 0,
                "method": ("gradient", "ours")[i % 2], "protocol": "paper", "insertion": 0.5,
                "deletion": 0.1, "id": 0.4, "insertion_curve": curves[0],
                "deletion_curve": curves[1], "localization": None, "conservation": None}) + "\n")


def test_readers_stream_the_results_in_memory_far_below_the_file(tmp_path):
    """Resume reads keys only; the summary keeps a few numbers a row and sums the curves (the
    old readers held the whole file and every curve: several times the file's size)."""
    _synthetic(tmp_path / "results.jsonl", 4000)
    size = (tmp_path / "results.jsonl").stat().st_size
    from relprop.evaluation.classification import _Store

    tracemalloc.start()
    try:
        keys = _Store(tmp_path, ["gradient", "ours"]).done
        _, resume_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        run = results.load_rows(tmp_path)
        curves = run.curves.means()
        _, summary_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(keys) == len(run.rows) == 4000
    print(f"peaks: resume {resume_peak}, summary {summary_peak}, file {size} bytes")
    assert resume_peak < size / 4 and summary_peak < size / 2, (resume_peak, summary_peak, size)
    curve = np.mean([json.loads(line)["insertion_curve"] for line in
                     (tmp_path / "results.jsonl").read_text().splitlines()[::2]], axis=0)
    np.testing.assert_allclose(curves["paper"]["gradient"]["insertion"], curve, atol=1e-12)
    assert all(isinstance(r, ResultRow) and not r.insertion_curve for r in run.rows)


def test_a_shard_file_named_with_a_non_ascii_digit_is_not_a_rank(tmp_path):
    """'results.rank².jsonl' is no rank's file: `str.isdigit` took '²', and `int` then failed."""
    for name in ("results.jsonl", "results.rank1.jsonl", "results.rank0.jsonl", "results.rank².jsonl"):
        (tmp_path / name).write_text("")
    assert [p.name for p in results.shard_files(tmp_path, "results")] == [
        "results.jsonl", "results.rank0.jsonl", "results.rank1.jsonl"]


def test_a_busy_folder_names_its_holder_even_in_the_instant_before_it_wrote_who_it_is(tmp_path):
    """The holder takes the lock, then writes who it is: a second run in between waited for the
    name (it said "holder unknown" before, and the two-writers test failed now and then)."""
    import fcntl
    import threading

    from relprop.errors import BusyError

    lock = tmp_path / results.LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    holder = {"pid": 4242, "host": "elsewhere", "started": "2026-12-06T00:00:00+00:00"}
    writer = threading.Timer(0.3, lambda: lock.write_text(json.dumps(holder) + "\n"))
    writer.start()
    try:
        with pytest.raises(BusyError, match=r"in use by another relprop evaluate \(pid 4242 on elsewhere"):
            results.RunLock(tmp_path)
    finally:
        writer.join()
        os.close(fd)
