"""torchvision weights names (issue #15, #9 items 3 and 10): the default model, the torch hub cache
under TORCH_HOME, --offline, no network, corrupt or unsafe cached files, the shipped ImageNet class
list; and the shared model options with the stated preprocessing assumption (#9 item 2)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from torchvision.models import ResNet50_Weights

from relprop.cli.main import main
from relprop.errors import CheckpointError
from relprop.models import imagenet_classes, load_model, torchvision_weights

from sharedfiles import SHARED, shared_path

SRC = Path(__file__).resolve().parents[1] / "src"
V2_FILE = "resnet50-11ad3fa6.pth"


def _photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    torch.manual_seed(1)
    Image.fromarray((torch.rand(300, 400, 3) * 255).byte().numpy()).save(path)
    return path


def test_default_model_is_resnet50_imagenet1k_v2_from_the_cache(imagenet_torch_home, tmp_path,
                                                               monkeypatch, capsys):
    home, state = imagenet_torch_home
    monkeypatch.setenv("TORCH_HOME", str(home))
    photo = _photo(tmp_path)
    assert main(["explain", str(photo), "--methods", "gradcam", "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert ("relprop explain: model: torchvision resnet50 with ResNet50_Weights.IMAGENET1K_V2 "
            "(Resize 232 -> CenterCrop 224, ImageNet mean/std)") in err
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").open()]
    # independent reference: torchvision's model and the weights' own transforms
    weights = ResNet50_Weights.IMAGENET1K_V2
    reference = torchvision.models.resnet50()
    reference.load_state_dict(state)
    with torch.no_grad():
        probs = reference.eval()(weights.transforms()(Image.open(photo).convert("RGB"))[None]).softmax(1)[0]
    assert record["pred"] == int(probs.argmax())
    assert record["pred_name"] == weights.meta["categories"][record["pred"]]
    assert record["prob"] == pytest.approx(float(probs.max()), abs=1e-4)


def test_other_names_resolve_through_torchvision(imagenet_torch_home, monkeypatch):
    home, _ = imagenet_torch_home
    monkeypatch.setenv("TORCH_HOME", str(home))
    v1 = torchvision_weights("IMAGENET1K_V1", arch="resnet50")
    assert v1.weights is ResNet50_Weights.IMAGENET1K_V1
    assert v1.cache_path == home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert torchvision_weights("ResNet50_Weights.DEFAULT").weights is ResNet50_Weights.IMAGENET1K_V2
    assert torchvision_weights("DEFAULT", "resnet101").cache_path.name == "resnet101-cd907fc2.pth"
    assert torchvision_weights("model.pt") is None
    _, info = load_model("IMAGENET1K_V1", arch="resnet50", offline=True)
    assert (info.preprocessing.resize, info.preprocessing.crop, info.source.name) == (256, 224, "ResNet50_Weights.IMAGENET1K_V1")
    assert info.classes[:2] == ["n01440764", "n01443537"] and info.class_names[1] == "goldfish"
    with pytest.raises(CheckpointError, match="are resnet50's weights, not --arch resnet18's"):
        load_model("ResNet50_Weights.IMAGENET1K_V2", arch="resnet18")
    with pytest.raises(CheckpointError, match="name the architecture too"):
        load_model("IMAGENET1K_V2")


def test_offline_without_the_file_is_one_line_naming_url_and_cache_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    code = main(["explain", str(_photo(tmp_path)), "--arch", "resnet101", "--weights", "DEFAULT",
                 "--offline", "--out", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    cache = tmp_path / "home" / "hub" / "checkpoints" / "resnet101-cd907fc2.pth"
    assert err == (f"relprop explain: error: ResNet101_Weights.IMAGENET1K_V2: not in the torch hub "
                   f"cache and --offline forbids downloading it; download "
                   f"https://download.pytorch.org/models/resnet101-cd907fc2.pth to {cache}\n")
    assert not cache.exists()


def test_without_a_network_the_error_says_where_the_file_goes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    env.update(TORCH_HOME=str(tmp_path / "home"), PYTHONPATH=str(SRC),
               HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")  # refused
    run = subprocess.run([sys.executable, "-m", "relprop", "explain", str(_photo(tmp_path)),
                          "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    cache = tmp_path / "home" / "hub" / "checkpoints" / V2_FILE
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("relprop explain: error: ResNet50_Weights.IMAGENET1K_V2: cannot download "
                           f"https://download.pytorch.org/models/{V2_FILE} (")
    assert last.endswith(f"without a network, put that file at {cache}")
    assert not cache.exists()


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def _cached(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder / V2_FILE


def test_corrupt_cached_file_is_one_relprop_line(tmp_path, monkeypatch):
    path = _cached(tmp_path, monkeypatch)
    path.write_bytes(b"<html>proxy login</html>")
    with pytest.raises(CheckpointError) as error:
        load_model(offline=True)
    assert str(error.value) == (f"{path}: not a PyTorch weights file (torch.save writes a zip "
                                "archive; this is something else)")
    torch.save({"x": torch.zeros(3)}, path)
    path.write_bytes(path.read_bytes()[:100])  # a cut download
    with pytest.raises(CheckpointError, match="corrupt or truncated PyTorch file"):
        load_model(offline=True)


def test_unsafe_pickle_is_refused_in_relprops_words(tmp_path, monkeypatch, capsys):
    path = _cached(tmp_path, monkeypatch)
    path.write_bytes(pickle.dumps({"fc.weight": _Payload()}, protocol=2))
    with pytest.raises(CheckpointError) as error:
        load_model(offline=True)
    message = str(error.value)
    assert "code ran" not in capsys.readouterr().out  # weights_only=True on the cached file too
    assert message.startswith(f"{path}: loading this file needs pickle code execution "
                              "(it stores the Python object print, not only tensors); "
                              "relprop refuses it on purpose")
    assert "\n" not in message and "\x1b" not in message and "add_safe_globals" not in message
    model_file = tmp_path / "whole_model.pt"
    torch.save(torchvision.models.resnet18(num_classes=2), model_file)
    with pytest.raises(CheckpointError, match="Python object torchvision.models.resnet.ResNet"):
        load_model(model_file)


def test_imagenet_class_list_matches_torchvision_and_the_shared_photos():
    rows = imagenet_classes()
    wnids = [wnid for wnid, _ in rows]
    assert len(rows) == 1000 and wnids == sorted(wnids) and len(set(wnids)) == 1000
    categories = ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    differ = {wnid: cat for (wnid, lemmas), cat in zip(rows, categories, strict=True)
              if lemmas.split(",")[0] != cat}
    # torchvision renamed the two lemmas that occur twice in ImageNet-1k
    assert differ == {"n02012849": "crane bird", "n03710721": "maillot tank suit"}
    photos = sorted((SHARED / "data" / "imagenet-samples").glob("*.JPEG"))
    if not photos:
        shared_path("data", "imagenet-samples")
    assert len(photos) == 100
    exact = spaced = 0
    for photo in photos:
        wnid, label = photo.stem.split("_", 1)
        category = categories[wnids.index(wnid)]
        exact += label == category
        spaced += label.replace("_", " ") == category
    assert (exact, spaced) == (49, 100)  # file names spell spaces as underscores


def test_shipped_as_package_data():
    pyproject = (SRC.parent / "pyproject.toml").read_text()
    assert 'relprop = ["resources/*.tsv"]' in pyproject
    header = (SRC / "relprop" / "resources" / "imagenet_classes.tsv").read_text().splitlines()[:3]
    assert "tools/make_imagenet_classes.py" in " ".join(header) and "timm" in header[2]
