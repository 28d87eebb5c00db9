"""`relprop evaluate --protocol road --ties random --seed N` end to end on two tin10 images, and
the tie mode and seed in rows, keys, run.json, resumes and summaries."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from relprop.cli.main import main
from relprop.errors import InputError
from relprop.evaluation.classification import EvalConfig
from relprop.evaluation.results import ResultRow, check_resume, summarize, summary_markdown

from sharedfiles import copy_tin10_val, shared_path

IMAGES = {"n01443537": ["val_1230.JPEG"], "n01882714": ["val_1083.JPEG"]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return copy_tin10_val(tmp_path_factory.mktemp("data"), IMAGES)


def _args(data, out, *extra):
    return ["evaluate", "--weights", str(shared_path("models", "resnet18_tin10.pt")),
            "--data", str(data), "--methods", "gradcam,ours+hq", "--protocol", "paper,road",
            "--step", "6000", "--batch-size", "2", "--device", "cpu", "--out", str(out), *extra]


def _records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def random_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("random")
    assert main(_args(dataset, out, "--ties", "random", "--seed", "3")) == 0
    return out


def test_rows_run_json_and_summary_record_the_tie_mode_and_seed(random_run):
    records = _records(random_run)
    assert len(records) == 2 * 2 * 2
    assert {(r["ties"], r["seed"]) for r in records} == {("random", 3)}
    for r in records:
        assert r["id"] == pytest.approx(r["insertion"] - r["deletion"])
        if r["protocol"] == "road":
            assert len(r["insertion_curve"]) == len(r["deletion_curve"]) == 10  # 0, 10, ..., 90 %
            assert r["insertion_curve"][0] == r["deletion_curve"][0]  # both start at the image
    settings = json.loads((random_run / "run.json").read_text())["settings"]
    assert (settings["ties"], settings["seed"]) == ("random", 3)
    assert settings["road"]["percentages"] == list(range(0, 100, 10))
    summary = json.loads((random_run / "summary.json").read_text())
    assert summary["gradcam"]["protocols"]["road"]["ties"] == "random"
    assert summary["gradcam"]["protocols"]["road"]["seed"] == 3
    text = (random_run / "summary.md").read_text()
    assert "## Protocol `road`, ties random, seed 3" in text and "| Method | LeRF ↑ | MoRF ↓ |" in text
    assert "## Protocol `paper`, ties random, seed 3" in text


def test_a_row_is_rescored_alike_from_its_map_and_image_id(random_run, dataset):
    """The random ties and ROAD's noise depend on (seed, image path) only, not on the batch."""
    from relprop.data import Item, load_item
    from relprop.evaluation.metrics import insertion_deletion
    from relprop.methods import HeatQuantized, get_method
    from relprop.models import load_model, preprocessing

    model, info = load_model(shared_path("models", "resnet18_tin10.pt"))
    for protocol in ("paper", "road"):
        record = next(r for r in _records(random_run) if r["method"] == "ours+hq"
                      and r["protocol"] == protocol and r["image"].startswith("n01882714"))
        x, _ = load_item(dataset, Item(record["image"], record["label"]), preprocessing(info), info)
        method = get_method("ours", model)
        heat = HeatQuantized(method, "sum").quantize(method.attribute(x[None]))[:, 0]
        again = insertion_deletion(model, x[None], heat, [record["label"]], protocol, mean=info.mean,
                                   std=info.std, step=6000, ties="random", seed=3,
                                   ids=[record["image"]])
        assert again.insertion[0] == pytest.approx(record["insertion"], abs=1e-6)
        assert again.deletion[0] == pytest.approx(record["deletion"], abs=1e-6)


def test_a_resume_with_another_seed_or_tie_mode_is_refused(random_run, dataset, capsys):
    before = (random_run / "results.jsonl").read_text()
    for extra, said in ((("--ties", "random", "--seed", "4"), "different settings (seed"),
                        (("--ties", "reference", "--seed", "3"), "different settings (ties")):
        assert main(_args(dataset, random_run, *extra)) == 1
        assert said in capsys.readouterr().err
    assert (random_run / "results.jsonl").read_text() == before


@pytest.mark.parametrize("bad", [{"ties": "sorted"}, {"seed": -2}])
def test_bad_tie_settings_are_one_line_errors(bad, tmp_path):
    with pytest.raises(InputError):
        EvalConfig(data=tmp_path / "d", out=tmp_path / "o", methods=("gradcam",), **bad)


def test_unknown_protocol_on_the_command_line_lists_the_registry(dataset, tmp_path, capsys):
    assert main(_args(dataset, tmp_path / "o")[:-2] + ["--protocol", "roar", "--out",
                                                       str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert "unknown protocol 'roar'" in err and "paper, rise, road" in err


# ---------------------------------------------------------------- rows and keys


def _row(protocol="paper", ties=None, seed=None, image="a.jpg", id_=0.5):
    data = {"image": image, "method": "m", "protocol": protocol, "insertion": id_, "deletion": 0.0,
            "id": id_, "checkpoint_sha256": "s"}
    if ties is not None:
        data.update(ties=ties, seed=seed)
    return ResultRow.from_dict(data)


def test_the_key_holds_the_tie_mode_and_the_seed_where_it_changes_the_score():
    old = _row()  # written before ties were recorded
    assert (old.ties, old.seed) == ("reference", None) and "seed" not in old.scores
    assert old.key == _row(ties="reference", seed=7).key  # the seed changes no paper score
    assert _row(ties="random", seed=1).key != _row(ties="random", seed=2).key
    assert _row("road", "reference", 1).key != _row("road", "reference", 2).key  # ROAD's noise
    assert _row(ties="random", seed=1).key != old.key
    again = ResultRow.from_dict(_row(ties="random", seed=1).to_dict())
    assert (again.ties, again.seed, again.key) == ("random", 1, _row(ties="random", seed=1).key)


def test_a_summary_refuses_rows_of_two_tie_modes_and_names_its_mode():
    rows = [_row(ties="random", seed=1, image=f"{i}.jpg", id_=i / 10) for i in range(3)]
    summary = summarize(rows, ["m"], ["paper"])
    assert summary["m"]["protocols"]["paper"]["id"] == pytest.approx(0.1)
    assert "## Protocol `paper`, ties random, seed 1" in summary_markdown(summary, ["paper"])
    with pytest.raises(InputError, match="mix tie modes"):
        summarize([*rows, _row(ties="random", seed=2, image="9.jpg")], ["m"], ["paper"])
    assert "ties reference (" in summary_markdown(summarize([_row()], ["m"], ["paper"]), ["paper"])


def test_a_run_written_before_tie_modes_resumes_in_the_reference_mode(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"settings": {"protocols": ["paper"], "block": 1}}))
    check_resume(path, {"protocols": ["paper"], "block": 1, "ties": "reference", "seed": 0}, str)
    with pytest.raises(InputError, match="different settings \\(ties"):
        check_resume(path, {"protocols": ["paper"], "block": 1, "ties": "random", "seed": 0}, str)


def test_random_ties_change_heat_quantized_scores_only_through_ties():
    """HQ maps have 8 levels: the tie mode changes their paper scores; a tie-free map's do not."""
    from relprop.evaluation.metrics import insertion_deletion

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2)).eval()
    x = torch.randn(1, 3, 8, 8)
    smooth = torch.randn(1, 8, 8)
    levels = torch.floor((smooth - smooth.min()) / (smooth.max() - smooth.min()) * 7.999)
    kwargs = {"mean": [0.0] * 3, "std": [1.0] * 3, "step": 4}
    scores = {(name, ties): insertion_deletion(model, x, heat, [0], "paper", ties=ties, **kwargs).id[0]
              for name, heat in (("smooth", smooth), ("levels", levels)) for ties in ("reference", "random")}
    assert scores["smooth", "reference"] == scores["smooth", "random"]
    assert scores["levels", "reference"] != scores["levels", "random"]
    assert np.isfinite(list(scores.values())).all()
