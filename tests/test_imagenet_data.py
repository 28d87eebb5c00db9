"""ImageNet validation layouts (class folders by wnid, the flat ILSVRC2012_val_* folder with Kaggle's
LOC_val_solution.csv, files named by wnid), labels from the model's own classes (#9 item 1), and the
paper's ImageNet protocol as `relprop evaluate`'s default (#15)."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from PIL import Image
from torchvision.models import ResNet50_Weights

from relprop.cli.main import main
from relprop.data import discover
from relprop.errors import InputError
from relprop.models import imagenet_wnids

from sharedfiles import shared_path

CATEGORIES = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


def _image(path, shade=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (shade, 80, 160)).save(path)


def test_files_named_by_wnid(tmp_path):
    root = shared_path("data", "imagenet-samples")
    data = discover(root, imagenet_wnids(), CATEGORIES)
    assert data.layout == "wnid-names" and len(data.items) == 100 and not data.unknown
    for item in data.items:
        assert imagenet_wnids()[item.label] == item.path[:9]


def test_wnid_class_folders_and_unknown_folders_are_left_out(tmp_path):
    _image(tmp_path / "n01440764" / "a.JPEG")
    _image(tmp_path / "n01443537" / "b.JPEG")
    _image(tmp_path / "holiday" / "c.JPEG")
    _image(tmp_path / "holiday" / "d.JPEG")
    data = discover(tmp_path, imagenet_wnids(), CATEGORIES)
    assert [(it.path, it.label) for it in data.items] == [("n01440764/a.JPEG", 0), ("n01443537/b.JPEG", 1)]
    assert data.unknown == {"holiday": 2}


def test_class_folders_by_class_name(tmp_path):
    _image(tmp_path / "king_penguin" / "a.png")
    _image(tmp_path / "Goldfish" / "b.png")
    data = discover(tmp_path, imagenet_wnids(), CATEGORIES)
    assert sorted((it.path, it.label) for it in data.items) == [
        ("Goldfish/b.png", CATEGORIES.index("goldfish")),
        ("king_penguin/a.png", CATEGORIES.index("king penguin"))]


def test_flat_val_folder_with_kaggle_solution_csv(tmp_path):
    val = tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    truth = {"ILSVRC2012_val_00000001": "n01751748", "ILSVRC2012_val_00000002": "n09193705",
             "ILSVRC2012_val_00000003": "n02105855"}
    for stem in truth:
        _image(val / f"{stem}.JPEG")
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        + "".join(f"{stem},{wnid} 10 20 30 40 {wnid} 1 2 3 4 \n" for stem, wnid in truth.items()))
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\n")
    data = discover(val, imagenet_wnids(), CATEGORIES)
    assert data.layout == "imagenet-val"
    assert [(it.path, it.label) for it in data.items] == [
        (f"{stem}.JPEG", imagenet_wnids().index(wnid)) for stem, wnid in truth.items()]
    assert CATEGORIES[data.items[2].label] == "Shetland sheepdog"
    _image(val / "ILSVRC2012_val_00000004.JPEG")
    with pytest.raises(InputError, match="1 images are not in .*LOC_val_solution.csv"):
        discover(val, imagenet_wnids(), CATEGORIES)


def test_flat_val_folder_without_a_ground_truth_is_one_line(tmp_path):
    _image(tmp_path / "ILSVRC2012_val_00000001.JPEG")
    (tmp_path / "ILSVRC2012_validation_ground_truth.txt").write_text("490\n")
    with pytest.raises(InputError, match="needs LOC_val_solution.csv .Kaggle. in the folder or a parent"):
        discover(tmp_path, imagenet_wnids(), CATEGORIES)


def test_no_folder_of_the_model_is_refused_with_both_lists(tmp_path):
    for name in ("cats", "dogs"):
        _image(tmp_path / name / "x.png")
    with pytest.raises(InputError) as error:
        discover(tmp_path, ["n01", "n02", "n03"], ["ant", "bee", "cow"])
    assert str(error.value) == (
        f"--data {tmp_path}: none of its 2 classes (cats, dogs) is a class of the model, whose 3 "
        "classes are n01, n02, n03; name the class folders by the model's class ids or names, or "
        "give the model's classes with --classes FILE")


@pytest.mark.slow
def test_evaluate_default_is_the_papers_imagenet_protocol(imagenet_torch_home, tmp_path,
                                                          monkeypatch, capsys):
    """`relprop evaluate --data VAL --per-class 1`: ResNet50_Weights.IMAGENET1K_V1, Resize 256 ->
    CenterCrop 224, the ground-truth class scored. On the 100 shared photos, of which --limit keeps
    8 and a large --step 3 frames (all 100 take 7 minutes on 2 busy cores; their labels are checked
    by test_files_named_by_wnid through the same discovery)."""
    home, state = imagenet_torch_home
    monkeypatch.setenv("TORCH_HOME", str(home))
    root = shared_path("data", "imagenet-samples")
    out = tmp_path / "out"
    assert main(["evaluate", "--data", str(root), "--per-class", "1", "--methods", "gradcam",
                 "--limit", "8", "--step", "20000", "--batch-size", "8", "--device", "cpu", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert ("relprop evaluate: model: torchvision resnet50 with ResNet50_Weights.IMAGENET1K_V1 "
            "(Resize 256 -> CenterCrop 224, ImageNet mean/std)") in err
    run_info = json.loads((out / "run.json").read_text())
    settings = run_info["settings"]
    assert run_info["labels"]["class_names"][:2] == ["tench", "goldfish"]  # for the report
    assert settings["preprocessing"] == [{"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406],
                                          "std": [0.229, 0.224, 0.225]}]
    records = [json.loads(line) for line in (out / "results.jsonl").open()]
    assert len(records) == 8
    wnids = imagenet_wnids()
    for record in records:
        assert wnids[record["label"]] == record["image"][:9]
    # the last insertion frame is the whole image: its score is the ground-truth class's probability
    reference = torchvision.models.resnet50()
    reference.load_state_dict(state)
    transform = ResNet50_Weights.IMAGENET1K_V1.transforms()
    first = records[0]
    with torch.no_grad():
        x = transform(Image.open(root / first["image"]).convert("RGB"))[None]
        probs = reference.eval()(x).softmax(1)[0]
    assert first["insertion_curve"][-1] == pytest.approx(float(probs[first["label"]]), abs=1e-4)
    assert first["pred"] == int(probs.argmax())
