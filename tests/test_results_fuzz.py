"""Fuzzing the readers of an evaluate folder (hypothesis): any bytes in results.jsonl or run.json,
and any JSON shaped like a row, give a result or one RelpropError line, never another exception."""

from __future__ import annotations

import json
import math
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relprop.errors import RelpropError
from relprop.evaluation.compare import paired_differences
from relprop.evaluation.results import (
    ReadCounts,
    check_resume,
    load_rows,
    read_run_info,
    run_inputs,
    summarize,
    summary_markdown,
)

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
ROW_KEYS = ["image", "method", "protocol", "checkpoint", "checkpoint_sha256", "label", "pred",
            "channels", "insertion", "deletion", "id", "insertion_curve", "deletion_curve",
            "localization", "conservation", "failure", "input"]
rows = st.dictionaries(st.sampled_from(ROW_KEYS), json_values, max_size=len(ROW_KEYS)) | json_values
good = {"image": "a.png", "method": "m", "protocol": "paper", "insertion": 0.5, "deletion": 0.1,
        "id": 0.4, "insertion_curve": [0.5, 0.5], "deletion_curve": [0.1, 0.1]}


def _one_line(error: RelpropError) -> None:
    text = str(error)
    assert text and "\n" not in text


def _read_everything(out: Path) -> None:
    try:
        run = load_rows(out, counts=ReadCounts())
        rows = [r for r in run.rows]
        summary = summarize(rows, sorted({r.method for r in rows}), ["paper", "rise"])
        summary_markdown(summary, ["paper", "rise"], run.counts.notes())
        run.curves.means()
        if rows:
            paired_differences(rows, rows[0].method)
    except RelpropError as error:
        _one_line(error)


@FUZZ
@given(data=st.binary(max_size=400))
def test_any_bytes_in_results_are_rows_or_one_line(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("bytes")
    (out / "results.jsonl").write_bytes(json.dumps(good).encode() + b"\n" + data)
    _read_everything(out)


@FUZZ
@given(records=st.lists(rows, min_size=1, max_size=4))
def test_any_json_rows_are_rows_or_one_line(tmp_path_factory, records):
    out = tmp_path_factory.mktemp("rows")
    lines = [json.dumps(good)] + [json.dumps(r) for r in records]
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")
    _read_everything(out)


@FUZZ
@given(data=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()) |
       st.dictionaries(st.sampled_from(["settings", "resumed", "labels", "inputs", "command"]),
                       json_values, max_size=5).map(lambda v: json.dumps(v).encode()))
def test_any_run_record_is_read_or_one_line(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("run")
    path = out / "run.json"
    path.write_bytes(data)
    try:
        info = read_run_info(path)
        run_inputs(info)
        check_resume(path, {"data": "x", "methods": ["m"]}, str, {"a.png": "1:2"})
    except RelpropError as error:
        _one_line(error)


def test_the_deepest_run_json_is_one_line(tmp_path):
    path = tmp_path / "run.json"
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    try:
        read_run_info(path)
    except RelpropError as error:
        assert "nested too deep" in str(error)
    else:
        raise AssertionError("read")


def test_fuzz_rows_that_are_kept_have_finite_numbers_in_the_summary(tmp_path):
    """The readers' promise beside the fuzz: a row with a NaN score is no number in the summary."""
    (tmp_path / "results.jsonl").write_text(
        json.dumps(good) + "\n" + json.dumps({**good, "image": "b.png", "id": math.nan}) + "\n")
    run = load_rows(tmp_path)
    stats = summarize(run.rows, ["m"], ["paper"])["m"]
    assert (stats["n"], stats["failed"], stats["id"]) == (1, 1, 0.4)
