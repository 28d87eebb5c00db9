"""`relprop evaluate` end to end on a few tin10 images: records, summary, saved maps, a corrupt
image, resuming after an interruption, and refusing to resume under other settings."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from relprop.cli.main import main
from relprop.evaluation.classification import summarize

from sharedfiles import copy_tin10_val, shared_path

IMAGES = {"n01443537": ["val_1230.JPEG", "val_1284.JPEG"], "n01882714": ["val_1083.JPEG"]}
METHODS, PROTOCOLS = ["gradcam", "ours+hq"], ["paper", "rise"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three tin10 val images with their boxes, and one corrupt file beside them."""
    root = copy_tin10_val(tmp_path_factory.mktemp("data"), IMAGES)
    (root / "n01882714" / "val_broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def _args(data, out, *extra):
    return ["evaluate", "--weights", str(shared_path("models", "resnet18_tin10.pt")),
            "--data", str(data), "--methods", ",".join(METHODS), "--protocol", ",".join(PROTOCOLS),
            "--step", "6000", "--batch-size", "2", "--device", "cpu", "--out", str(out), *extra]


def _records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    code = main(_args(dataset, out, "--save-maps"))
    return code, out


def test_results_summary_and_maps(full_run, dataset, capsys):
    code, out = full_run
    assert code == 1  # one unreadable image
    records = _records(out)
    assert len(records) == 3 * len(METHODS) * len(PROTOCOLS)
    assert {(r["image"], r["method"], r["protocol"]) for r in records} == {
        (f"{w}/{n}", m, p) for w, names in IMAGES.items() for n in names for m in METHODS for p in PROTOCOLS}
    for r in records:
        assert r["label"] == (0 if r["image"].startswith("n01443537") else 1)
        assert r["id"] == pytest.approx(r["insertion"] - r["deletion"])
        assert len(r["insertion_curve"]) == (3 if r["protocol"] == "paper" else 4)  # 12544 px / 6000
        assert set(r["localization"]) >= {"pointing", "energy", "centre_pointing", "centre_energy"}
        assert (r["conservation"] is not None) == (r["method"] == "ours+hq")
    ours = next(r for r in records if r["method"] == "ours+hq")
    assert ours["conservation"]["input_over_output"] == pytest.approx(1.0, abs=1e-4)

    summary = json.loads((out / "summary.json").read_text())
    for method in METHODS:
        rows = [r for r in records if r["method"] == method and r["protocol"] == "paper"]
        assert summary[method]["n"] == 3
        assert summary[method]["id"] == pytest.approx(np.mean([r["id"] for r in rows]))
        assert summary[method]["protocols"]["rise"]["n"] == 3
    assert "| gradcam |" in (out / "summary.md").read_text()
    assert (out / "curves_paper.png").is_file() and (out / "curves_rise.png").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["checkpoints"][0]["sha256"] == records[0]["checkpoint_sha256"]
    assert run["versions"]["torch"] == torch.__version__

    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["image"] for s in skipped] == ["n01882714/val_broken.JPEG"]


def test_saved_maps_are_the_maps_that_were_ranked(full_run, dataset):
    from relprop.data import Item, load_item
    from relprop.evaluation.metrics import insertion_deletion
    from relprop.models import load_model, preprocessing

    _, out = full_run
    model, info = load_model(shared_path("models", "resnet18_tin10.pt"))
    record = next(r for r in _records(out) if r["method"] == "ours+hq" and r["protocol"] == "paper")
    heat = np.load(out / "maps" / "ours+hq" / (record["image"].split("/")[1][:-5] + ".npy"))
    assert heat.shape == (112, 112) and len(np.unique(heat)) <= 8
    x, _ = load_item(dataset, Item(record["image"], record["label"]), preprocessing(info), info)
    again = insertion_deletion(model, x[None], torch.from_numpy(heat)[None], [record["label"]],
                               "paper", mean=info.mean, std=info.std, step=6000)
    assert again.insertion[0] == pytest.approx(record["insertion"], abs=1e-6)


def test_resume_after_interruption_loses_and_repeats_nothing(full_run, dataset, tmp_path, monkeypatch):
    import relprop.evaluation.metrics

    real, calls = relprop.evaluation.metrics.insertion_deletion, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(relprop.evaluation.metrics, "insertion_deletion", interrupted)
    assert main(_args(dataset, tmp_path)) == 130
    partial = _records(tmp_path)
    assert 0 < len(partial) < 12
    with open(tmp_path / "results.jsonl", "a") as handle:  # a line cut by a kill
        handle.write('{"checkpoint": "cut')
    monkeypatch.setattr(relprop.evaluation.metrics, "insertion_deletion", real)

    assert main(_args(dataset, tmp_path)) == 1
    resumed = _records(tmp_path)
    assert resumed[:len(partial)] == partial  # kept, not recomputed
    keys = [(r["image"], r["method"], r["protocol"]) for r in resumed]
    assert len(keys) == len(set(keys)) == 12
    reference = {(r["image"], r["method"], r["protocol"]): r for r in _records(full_run[1])}
    for r in resumed:
        assert r["insertion"] == pytest.approx(reference[r["image"], r["method"], r["protocol"]]["insertion"], abs=1e-6)


def test_resuming_with_other_settings_is_refused(full_run, dataset, capsys):
    _, out = full_run
    before = (out / "results.jsonl").read_text()
    assert main([*_args(dataset, out)[:-2], "--out", str(out), "--channels", "channel0"]) == 1
    assert "different settings (channels" in capsys.readouterr().err
    assert (out / "results.jsonl").read_text() == before


def test_several_checkpoints_are_summarized_over_per_checkpoint_means():
    def record(sha, image, insertion, deletion):
        return {"checkpoint_sha256": sha, "image": image, "method": "ours", "protocol": "paper",
                "insertion": insertion, "deletion": deletion, "id": insertion - deletion,
                "localization": None, "conservation": None}

    records = [record("a", "1", 0.6, 0.2), record("a", "2", 0.8, 0.2),   # mean ID 0.5
               record("b", "1", 0.5, 0.3), record("b", "2", 0.5, 0.1)]   # mean ID 0.3
    stats = summarize(records, ["ours"], ["paper"])["ours"]
    assert stats["checkpoints"] == 2 and stats["n"] == 2
    assert stats["id"] == pytest.approx(0.4)
    assert stats["id_std"] == pytest.approx(np.std([0.5, 0.3], ddof=1))
    assert stats["insertion"] == pytest.approx(0.6)


def test_folders_that_are_not_the_models_classes_are_refused_with_both_lists(tmp_path, capsys):
    from PIL import Image

    for i in range(11):  # folders that are not the checkpoint's wnids (they used to become 0..10)
        (tmp_path / "data" / f"class{i:02d}").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / f"class{i:02d}" / "x.png")
    code = main(["evaluate", "--weights", str(shared_path("models", "resnet18_tin10.pt")),
                 "--data", str(tmp_path / "data"), "--methods", "gradcam", "--out", str(tmp_path / "out")])
    assert code == 1
    assert capsys.readouterr().err == (
        f"relprop evaluate: error: --data {tmp_path / 'data'}: none of its 11 classes (class00, "
        "class01, class02, class03, class04, ... (6 more)) is a class of the model, whose 10 classes "
        "are n01443537, n01882714, n02056570, n02165456, n02279972, ... (5 more); name the class "
        "folders by the model's class ids or names, or give the model's classes with --classes FILE\n")


def test_a_folder_without_class_folders_is_refused_and_leaves_nothing(tmp_path, capsys):
    """Refused before any result: no run.json, and no empty --out folder either."""
    from PIL import Image

    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "val_1.JPEG")  # no class folder, no wnid
    out = tmp_path / "runs" / "flat"
    code = main(["evaluate", "--weights", str(shared_path("models", "resnet18_tin10.pt")),
                 "--data", str(tmp_path / "data"), "--methods", "gradcam", "--out", str(out)])
    assert code == 1
    assert capsys.readouterr().err == (
        f"relprop evaluate: error: --data {tmp_path / 'data'}: cannot tell the class of val_1.JPEG "
        "(put the images in class folders, or start their names with their wnid)\n")
    assert not out.exists()
    out.mkdir(parents=True)  # a folder that was there before stays
    assert main(["evaluate", "--weights", str(shared_path("models", "resnet18_tin10.pt")),
                 "--data", str(tmp_path / "data"), "--methods", "gradcam", "--out", str(out)]) == 1
    assert out.is_dir() and list(out.iterdir()) == []


def test_labels_come_from_the_models_classes_and_unknown_folders_are_listed(tmp_path, capsys):
    """One folder the model lacks must not shift the others' labels (the penguin stays a penguin)."""
    source = shared_path("data", "tin10", "val")
    data = tmp_path / "data"
    (data / "n02056570").mkdir(parents=True)
    shutil.copy(source / "n02056570" / "val_6457.JPEG", data / "n02056570")
    (data / "aardvark").mkdir()
    shutil.copy(source / "n01443537" / "val_1230.JPEG", data / "aardvark")
    (data / "king_penguin").mkdir()  # a class name works as well as the wnid
    shutil.copy(source / "n02056570" / "val_1073.JPEG", data / "king_penguin")
    out = tmp_path / "out"
    assert main(["evaluate", "--weights", str(shared_path("models", "resnet18_tin10.pt")),
                 "--data", str(data), "--methods", "gradcam", "--step", "6000", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert ("relprop evaluate: left out 1 images of 1 classes the model does not have: aardvark (1)"
            in capsys.readouterr().err)
    records = _records(out)
    classes = torch.load(shared_path("models", "resnet18_tin10.pt"), weights_only=True)["classes"]
    assert sorted((r["image"], r["label"]) for r in records) == [
        ("king_penguin/val_1073.JPEG", classes.index("n02056570")),
        ("n02056570/val_6457.JPEG", classes.index("n02056570"))]


def test_detection_task_is_handed_to_the_detection_evaluation(monkeypatch, tmp_path):
    """The CLI builds a typed config and passes the loaded detector; no Namespace goes below."""
    import relprop.evaluation.detection
    import relprop.models

    seen = []
    model = torch.nn.Identity()
    info = relprop.models.ModelInfo("ssd300_vgg16", 2, ["__background__", "cat"],
                                    relprop.models.Preprocessing(300))
    monkeypatch.setattr(relprop.models, "load_detector", lambda *a, **k: (model, info))
    monkeypatch.setattr(relprop.evaluation.detection, "evaluate_detection",
                        lambda m, classes, config: seen.append((m, classes, config)) or
                        {"images": 0, "true_positives": 0})
    monkeypatch.setattr(relprop.evaluation.detection, "summary_markdown", lambda *a: "")
    assert main(["evaluate", "--task", "detection", "--weights", "ssd.pt", "--model-def", "m.py:build",
                 "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--limit", "3"]) == 0
    ((m, classes, config),) = seen
    assert m is model and classes == ["__background__", "cat"]
    assert isinstance(config, relprop.evaluation.detection.DetectionEvalConfig)
    assert (config.limit, config.out, config.methods) == (3, tmp_path / "out",
                                                         relprop.evaluation.detection.METHODS)


def test_progress_bar_shows_each_burst_whole_with_a_sane_eta(tmp_path, capsys):
    """Rows come in bursts, a batch's at once: the bar drawn after a burst shows its end, an ETA
    from the average rate (it once showed the first row's, 'hours' for a minute's run), and the
    batch being computed."""
    import re
    import time
    from types import SimpleNamespace

    from relprop.evaluation.classification import _Progress

    progress = _Progress(tmp_path, SimpleNamespace(rank=0, world=1), rows=200, methods=1, protocols=2)
    assert "?" in capsys.readouterr().err.split("\r")[-1]  # no ETA before the first image
    time.sleep(1.0)  # the first batch computes
    for _ in range(100):  # then writes its rows at once: 50 of the 100 maps
        progress.update(1)
    progress.note("images 51-100 of 100: ours")
    shown = capsys.readouterr().err.split("\r")[-1]
    progress.close()
    assert " 50/100 " in shown and "images 51-100 of 100: ours" in shown
    minutes, seconds = map(int, re.search(r"<(\d+):(\d+)", shown).groups())
    assert 60 * minutes + seconds <= 5  # as long again as the first half took (about 1 s)
