"""Evaluation at scale, in one process: batched maps and frames give the one-image numbers,
summary.md carries SE and bootstrap CIs, `relprop compare` and `evaluate --baseline` agree with
scipy on the paired differences, and readers of sharded output take the union and skip (and
name) a cut last line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from relprop.cli.main import main
from relprop.evaluation.results import read_union, shard_files

from sharedfiles import copy_tin10_val, shared_path

IMAGES = {"n01443537": ["val_1230.JPEG", "val_1284.JPEG"], "n01882714": ["val_1083.JPEG"]}
METHODS = "ours,ours+hq,gradcam"  # Score-CAM at --batch-size 1: 512 forwards per image


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = copy_tin10_val(tmp_path_factory.mktemp("data"), IMAGES, boxes=False)
    return root


def _args(data, out, batch, *extra):
    return ["evaluate", "--weights", str(shared_path("models", "resnet18_tin10.pt")),
            "--data", str(data), "--methods", METHODS, "--protocol", "paper,rise", "--step", "3000",
            "--batch-size", str(batch), "--device", "cpu", "--out", str(out), *extra]


def _rows(out):
    return {(r["image"], r["method"], r["protocol"]): r
            for r in read_union(out, "results", lambda r: (r["image"], r["method"], r["protocol"]))}


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    one, batched = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("batched")
    assert main(_args(dataset, one, 1)) == 0
    assert main(_args(dataset, batched, 3, "--baseline", "gradcam")) == 0
    return one, batched


def test_batched_maps_and_frames_give_the_one_image_numbers(runs):
    one, batched = (_rows(out) for out in runs)
    assert one.keys() == batched.keys() and len(one) == 3 * 3 * 2
    for key, row in one.items():
        other = batched[key]
        for field in ("insertion", "deletion", "id"):
            assert other[field] == pytest.approx(row[field], abs=1e-6), (key, field)
        np.testing.assert_allclose(other["insertion_curve"], row["insertion_curve"], atol=1e-6)
        np.testing.assert_allclose(other["deletion_curve"], row["deletion_curve"], atol=1e-6)
        assert other["pred"] == row["pred"]


def test_summary_has_se_and_ci_and_the_paired_section(runs):
    _, out = runs
    summary = json.loads((out / "summary.json").read_text())
    ids = [r["id"] for r in _rows(out).values() if r["method"] == "ours" and r["protocol"] == "paper"]
    paper = summary["ours"]["protocols"]["paper"]
    assert paper["id_sem"] == pytest.approx(stats.sem(ids))
    assert paper["id_ci_low"] <= paper["id"] <= paper["id_ci_high"]
    text = (out / "summary.md").read_text()
    assert "uncertainty" in text and f"[{paper['id_ci_low']:.3f}, {paper['id_ci_high']:.3f}]" in text
    assert "minus `gradcam`" in text


def test_compare_reports_paired_differences_checked_against_scipy(runs, capsys):
    _, out = runs
    assert main(["compare", str(out), "--baseline", "gradcam"]) == 0
    printed = capsys.readouterr().out
    assert (out / "compare.md").read_text() == printed.rstrip("\n") + "\n" or printed.startswith(
        (out / "compare.md").read_text())
    rows = _rows(out)
    images = sorted({k[0] for k in rows})
    a = [rows[i, "ours", "rise"]["id"] for i in images]
    b = [rows[i, "gradcam", "rise"]["id"] for i in images]
    line = next(x for x in printed.split("## Protocol `rise`")[1].splitlines() if x.startswith("| ours |"))
    assert f"{np.mean(np.subtract(a, b)):+.4f}" in line
    expected_p = stats.wilcoxon(a, b).pvalue
    assert line.rstrip(" |").split("| ")[-1] == (f"{expected_p:.3f}" if expected_p >= 1e-3
                                                 else f"{expected_p:.2e}")


def test_compare_refuses_a_baseline_not_evaluated(runs, capsys):
    _, out = runs
    assert main(["compare", str(out), "--baseline", "ig"]) == 1
    err = capsys.readouterr().err
    assert "--baseline 'ig' is not among the evaluated methods" in err and err.count("\n") == 1


def test_union_reader_skips_and_names_a_cut_last_line(tmp_path, capsys):
    rows = [{"k": i} for i in range(3)]
    (tmp_path / "results.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / "results.rank1.jsonl").write_text(json.dumps(rows[2]) + "\n" + '{"k": 9')
    (tmp_path / "results.rank0.jsonl").write_text(json.dumps(rows[1]) + "\n" + json.dumps(rows[0]) + "\n")
    assert [p.name for p in shard_files(tmp_path, "results")] == [
        "results.jsonl", "results.rank0.jsonl", "results.rank1.jsonl"]
    found = read_union(tmp_path, "results", lambda r: r["k"])
    assert found == rows  # the duplicate of k=0 is read once, the cut line not at all
    assert "results.rank1.jsonl: ignored a partial last line" in capsys.readouterr().err
    assert (tmp_path / "results.rank1.jsonl").read_text().endswith('{"k": 9')  # not ours: untouched
    read_union(tmp_path, "results", lambda r: r["k"], repair=tmp_path / "results.rank1.jsonl")
    assert (tmp_path / "results.rank1.jsonl").read_text() == json.dumps(rows[2]) + "\n"


def test_report_shows_the_summary_confidence_intervals(runs, tmp_path):
    _, out = runs
    from relprop.report import build_report

    page = build_report(out, tmp_path / "report").read_text()
    paper = json.loads((out / "summary.json").read_text())["gradcam"]["protocols"]["rise"]
    assert 'id="uncertainty"' in page
    assert f"{paper['id']:.3f} ({paper['id_sem']:.3f})" in page
    assert f"[{paper['id_ci_low']:.3f}, {paper['id_ci_high']:.3f}]" in page
