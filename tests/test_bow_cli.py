"""The BoW classifier end to end through the real CLI: fit-bow on 3 tin10 images per class,
explain, evaluate (with the conservation column), report, and a tampered model file refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from relprop.cli.main import main

from sharedfiles import shared_path

METHODS = "bow-lrp,bow-lrp+hq,bow-occlusion"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("bow") / "tiny.bow.npz"
    code = main(["fit-bow", str(shared_path("data", "tin10", "train")), "--per-class", "3",
                 "--words", "12", "--out", str(path)])
    assert code == 0 and path.is_file()
    return path


@pytest.fixture(scope="module")
def val_subset(tmp_path_factory):
    """Two classes, one val image each, with their boxes."""
    source = shared_path("data", "tin10", "val")
    root = tmp_path_factory.mktemp("val")
    for wnid in sorted(p.name for p in source.iterdir() if p.is_dir())[:2]:
        (root / wnid).mkdir()
        first = sorted((source / wnid).glob("*.JPEG"))[0]
        shutil.copy(first, root / wnid / first.name)
        boxes = [line for line in (source / wnid / "boxes.txt").read_text().splitlines()
                 if line.split()[0] == first.name]
        (root / wnid / "boxes.txt").write_text("\n".join(boxes) + "\n")
    return root


def test_explain_writes_maps_of_the_bow_model(model, val_subset, tmp_path, capsys):
    out = tmp_path / "explained"
    assert main(["explain", str(val_subset), "--weights", str(model), "--methods",
                 "bow-lrp,bow-occlusion", "--hq", "--out", str(out), "--device", "cpu"]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[0]["methods"] == ["bow-lrp+hq", "bow-occlusion"]
    folder = out / records[0]["output"]
    heat = np.load(folder / "bow-lrp+hq.npy")
    assert heat.shape == (64, 64) and len(np.unique(heat)) <= 8
    assert (folder / "panel.png").is_file() and (out / "overview.png").is_file()


def test_evaluate_and_report(model, val_subset, tmp_path):
    out = tmp_path / "run"
    assert main(["evaluate", "--weights", str(model), "--data", str(val_subset), "--methods", METHODS,
                 "--out", str(out), "--device", "cpu", "--save-maps"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == set(METHODS.split(","))
    for record in records:
        assert 0.0 <= record["insertion"] <= 1.0 and record["localization"] is not None
        if record["method"] == "bow-lrp":
            assert record["conservation"]["input_over_output"] == pytest.approx(1.0, abs=1e-5)
    assert "bow-occlusion" in (out / "summary.md").read_text()
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "index.html").is_file()


def test_network_method_on_bow_model_and_tampered_file_are_one_line(model, val_subset, tmp_path, capsys):
    assert main(["explain", str(val_subset), "--weights", str(model), "--methods", "gradcam",
                 "--out", str(tmp_path / "a"), "--device", "cpu"]) == 1
    assert "needs a network" in capsys.readouterr().err
    damaged = tmp_path / "damaged.bow.npz"
    with np.load(model, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["intercept"] = arrays["intercept"] + 1.0
    with open(damaged, "wb") as handle:
        np.savez(handle, **arrays)
    assert main(["explain", str(val_subset), "--weights", str(damaged), "--methods", "bow-lrp",
                 "--out", str(tmp_path / "b"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"relprop explain: error: {damaged}: BoW model file is damaged or was modified "
                   "(hash mismatch)"]
