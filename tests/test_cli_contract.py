"""The command line's contract (issue #9): bounded inputs, CAMs on any CNN, resumable maps,
order-free methods, clean output folders, one-line errors, progress. Through the real CLI in a
subprocess, on real files, with small random-weight models."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

SRC = Path(__file__).resolve().parents[1] / "src"
CLASSES = ["ant", "bee", "cow"]


def relprop(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m relprop ARGS` as a user runs it (this checkout's source first on the path)."""
    environment = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                   **(env or {})}
    return subprocess.run([sys.executable, "-m", "relprop", *map(str, args)], capture_output=True,
                          text=True, env=environment, timeout=600)


def checkpoint(path: Path, arch: str, resize: int = 32) -> Path:
    """A relprop checkpoint of a random-weight torchvision model (seeded), 3 classes, no crop."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=len(CLASSES)).eval()
    torch.save({"arch": arch, "num_classes": len(CLASSES), "classes": CLASSES, "resize": resize,
                "crop": None, "mean": [0.5] * 3, "std": [0.25] * 3, "state_dict": model.state_dict()},
               path)
    return path


def picture(path: Path, size: tuple[int, int] = (40, 32), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def cli(capsys, *args: object) -> tuple[int, str]:
    """The same CLI in this process (for the quick one-line errors): exit status and stderr.
    An exception other than the CLI's own one-line errors would fail the test here."""
    from relprop.cli.main import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error:" in line]


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("ckpt") / "resnet18.pt", "resnet18")


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("ckpt") / "mobilenet.pt", "mobilenet_v3_small")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders named as the checkpoint's classes: two images of ant, one of bee."""
    root = tmp_path_factory.mktemp("data")
    for i, rel in enumerate(("ant/a1.png", "ant/a2.png", "bee/b1.png")):
        picture(root / rel, seed=i)
    return root


# ---------------------------------------------------------------- 4. bounded model input


def test_thin_strip_is_refused_in_one_line_and_the_others_are_explained(resnet, tmp_path):
    strip = tmp_path / "in" / "strip.png"
    strip.parent.mkdir()
    Image.new("RGB", (5000, 3), (200, 30, 30)).save(strip)
    assert strip.stat().st_size < 1000  # a few hundred bytes
    normal = picture(tmp_path / "in" / "normal.png")
    result = relprop("explain", strip, normal, "--weights", resnet, "--methods", "gradient",
                     "--device", "cpu", "--out", tmp_path / "out")
    assert result.returncode == 1, result.stderr
    (line,) = error_lines(result)
    assert line.startswith(f"relprop explain: error: {strip}: 5000x3 pixels: aspect ratio 1667:1")
    assert "Traceback" not in result.stderr
    assert (tmp_path / "out" / "normal" / "gradient.npy").is_file()
    assert not (tmp_path / "out" / "strip").exists()


def test_input_bound_follows_torchvision_resize(tmp_path):
    """The documented bound is what Resize would make: just inside passes, just outside fails."""
    from torchvision import transforms

    from relprop.errors import ImageError
    from relprop.images import MAX_ASPECT_RATIO, MAX_INPUT_PIXELS, BoundedTransform

    bounded = BoundedTransform(transforms.Compose([transforms.Resize(150), transforms.ToTensor()]), 150)
    wide = Image.new("RGB", (int(8 * 30), 30))  # exactly 8:1 -> 150 x 1200 = 180,000 pixels
    assert bounded(wide).shape == (3, 150, 1200) and 150 * 1200 <= MAX_INPUT_PIXELS
    with pytest.raises(ImageError, match="aspect ratio"):
        bounded(Image.new("RGB", (int(MAX_ASPECT_RATIO * 30) + 1, 30)))
    big = BoundedTransform(transforms.Resize(449), 449)  # a square: 449^2 > 4 x 224^2
    with pytest.raises(ImageError, match="201,601 pixels"):
        big(Image.new("RGB", (64, 64)))
    assert BoundedTransform(transforms.Resize(448), 448)(Image.new("RGB", (64, 64))).size == (448, 448)


def test_evaluate_skips_the_strip_and_the_report_lists_it(resnet, data, tmp_path):
    root = tmp_path / "data"
    for rel in ("ant/a1.png", "bee/b1.png"):
        picture(root / rel)
    Image.new("RGB", (3, 5000)).save(root / "bee" / "strip.png")
    result = relprop("evaluate", "--weights", resnet, "--data", root, "--methods", "gradient",
                     "--step", "300", "--device", "cpu", "--out", tmp_path / "eval")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.search(r"skipping bee/strip.png: 3x5000 pixels: aspect ratio 1667:1", result.stderr)
    report = relprop("report", tmp_path / "eval", "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "Skipped images (1)" in page and "bee/strip.png" in page and "aspect ratio 1667:1" in page


# ---------------------------------------------------------------- 5. CAMs on any CNN


def test_default_methods_run_on_a_mobilenet(mobilenet, tmp_path):
    """Every default method runs on MobileNetV3: Hardswish takes the identity rule, Grad-CAM its
    layer found from the graph (pytorch-grad-cam's documented MobileNet layer)."""
    image = picture(tmp_path / "x.png")
    result = relprop("explain", image, "--weights", mobilenet, "--device", "cpu", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "out" / "predictions.jsonl").read_text())
    assert "gradcam" in record["methods"] and "ig" in record["methods"] and len(record["methods"]) == 3
    cam = np.load(tmp_path / "out" / "x" / "gradcam.npy")
    from relprop.methods import get_method
    from relprop.models import load_model, preprocessing

    model, info = load_model(mobilenet)
    x = preprocessing(info)(Image.open(image).convert("RGB"))[None]
    expected = get_method("gradcam", model, layer=model.features[-1]).attribute(x)[0, 0]
    assert cam.shape == (32, 40)
    np.testing.assert_allclose(cam, expected.numpy(), atol=1e-5)


MODEL_DEF = """
from torch import nn


def build(meta):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, meta["num_classes"]))
"""


def test_a_method_that_cannot_run_is_reported_and_the_others_run(tmp_path):
    """Softplus has no rule: the LRP method is one line, Grad-CAM and IG still run (exit 1)."""
    (tmp_path / "net.py").write_text(MODEL_DEF)
    namespace: dict = {}
    exec(MODEL_DEF, namespace)
    torch.manual_seed(0)
    model = namespace["build"]({"num_classes": len(CLASSES)})
    torch.save({"arch": "custom", "num_classes": len(CLASSES), "classes": CLASSES, "resize": 32, "crop": None,
                "mean": [0.5] * 3, "std": [0.25] * 3, "state_dict": model.state_dict()}, tmp_path / "net.pt")
    image = picture(tmp_path / "x.png")
    result = relprop("explain", image, "--weights", tmp_path / "net.pt", "--model-def", f"{tmp_path / 'net.py'}:build",
                     "--device", "cpu", "--out", tmp_path / "out")
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert "cannot run on this model" in line and "Softplus" in line
    assert "Traceback" not in result.stderr
    record = json.loads((tmp_path / "out" / "predictions.jsonl").read_text())
    assert record["methods"] == ["gradcam", "ig"]


def test_cam_layer_option_and_a_wrong_name(mobilenet, tmp_path):
    image = picture(tmp_path / "x.png")
    run = relprop("explain", image, "--weights", mobilenet, "--methods", "gradcam", "--cam-layer",
                  "features.9", "--device", "cpu", "--out", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    from relprop.methods import get_method
    from relprop.models import load_model, preprocessing

    model, info = load_model(mobilenet)
    x = preprocessing(info)(Image.open(image).convert("RGB"))[None]
    expected = get_method("gradcam", model, layer=model.features[9]).attribute(x)[0, 0]
    np.testing.assert_allclose(np.load(tmp_path / "out" / "x" / "gradcam.npy"), expected.numpy(),
                               atol=1e-5)
    wrong = relprop("explain", image, "--weights", mobilenet, "--methods", "gradcam", "--cam-layer",
                    "features.99", "--device", "cpu", "--out", tmp_path / "out2")
    errors = [line for line in wrong.stderr.splitlines() if not line.startswith("relprop explain: note:")]
    assert wrong.returncode == 1 and len(errors) == 1  # a plain state dict adds its preprocessing note
    assert "--cam-layer 'features.99'" in errors[0]


# ---------------------------------------------------------------- 6, 7. resuming


def _evaluate(resnet, data, out, *extra, env=None):
    return relprop("evaluate", "--weights", resnet, "--data", data, "--step", "300", "--device", "cpu",
                   "--out", out, *extra, env=env)


def test_save_maps_on_resume_adds_the_maps_without_scoring_again(resnet, data, tmp_path):
    out = tmp_path / "eval"
    first = _evaluate(resnet, data, out, "--methods", "gradcam,gradient+hq")
    assert first.returncode == 0, first.stderr
    scores = (out / "results.jsonl").read_bytes()
    assert not (out / "maps").exists()
    again = _evaluate(resnet, data, out, "--methods", "gradcam,gradient+hq", "--save-maps")
    assert again.returncode == 0, again.stderr
    assert (out / "results.jsonl").read_bytes() == scores  # nothing scored twice
    maps = sorted(p.relative_to(out / "maps").as_posix() for p in (out / "maps").rglob("*.npy"))
    assert maps == [f"{m}/{s}.npy" for m in ("gradcam", "gradient+hq") for s in ("a1", "a2", "b1")]
    # the saved maps are the maps that were scored: ranking them again gives the same score
    from relprop.data import Item, load_item
    from relprop.evaluation.metrics import insertion_deletion
    from relprop.models import load_model, preprocessing

    model, info = load_model(resnet)
    for record in map(json.loads, scores.decode().splitlines()):
        heat = np.load(out / "maps" / record["method"] / f"{Path(record['image']).stem}.npy")
        x, _ = load_item(data, Item(record["image"], record["label"]), preprocessing(info), info)
        again = insertion_deletion(model, x[None], torch.from_numpy(heat)[None], [record["label"]],
                                   "paper", mean=info.mean, std=info.std, step=300)
        assert again.insertion[0] == pytest.approx(record["insertion"], abs=1e-6)


def test_methods_in_another_order_resume(resnet, data, tmp_path):
    out = tmp_path / "eval"
    assert _evaluate(resnet, data, out, "--methods", "gradient,gradcam").returncode == 0
    before = (out / "results.jsonl").read_bytes()
    again = _evaluate(resnet, data, out, "--methods", "gradcam,gradient", "--protocol", "paper")
    assert again.returncode == 0, again.stderr
    assert (out / "results.jsonl").read_bytes() == before
    assert len(json.loads((out / "run.json").read_text())["resumed"]) == 1


# ---------------------------------------------------------------- 8. output folders


def test_out_inside_the_input_folder_is_not_explained(resnet, tmp_path):
    folder = tmp_path / "photos"
    picture(folder / "one.png")
    picture(folder / "two.png", seed=1)
    for _ in range(2):
        result = relprop("explain", folder, "--weights", resnet, "--methods", "gradient",
                         "--device", "cpu", "--out", folder / "explained")
        assert result.returncode == 0, result.stderr
        lines = (folder / "explained" / "predictions.jsonl").read_text().splitlines()
        assert sorted(json.loads(line)["output"] for line in lines) == ["one", "two"]


def test_rerun_into_the_same_out_removes_what_is_stale(resnet, tmp_path):
    one, two = picture(tmp_path / "one.png"), picture(tmp_path / "two.png", seed=1)
    out = tmp_path / "out"
    assert relprop("explain", one, two, "--weights", resnet, "--methods", "gradient,gradcam",
                   "--device", "cpu", "--out", out).returncode == 0
    assert (out / "overview.png").is_file() and (out / "two" / "gradcam.npy").is_file()
    (out / "notes.txt").write_text("mine")
    (out / "one" / "mine.npy").write_bytes(b"mine")
    result = relprop("explain", one, "--weights", resnet, "--methods", "gradient", "--device", "cpu",
                     "--out", out)
    assert result.returncode == 0, result.stderr
    assert "removed" in result.stderr
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["manifest.json", "notes.txt", "one/gradient.npy", "one/gradient.png",
                     "one/mine.npy", "one/original.png", "one/panel.png", "predictions.jsonl"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert "notes.txt" not in manifest["files"] and "one/gradient.npy" in manifest["files"]


# ---------------------------------------------------------------- 9. one-line errors


@pytest.mark.parametrize("case", ["out-is-file", "out-unwritable", "mps", "bad-device"])
def test_explain_option_errors_are_one_line(resnet, tmp_path, capsys, case):
    image = picture(tmp_path / "x.png")
    out, device = tmp_path / "out", "cpu"
    if case == "out-is-file":
        out.write_text("a file")
    elif case == "out-unwritable":
        if os.geteuid() == 0:  # root writes anywhere a normal folder is: use a kernel file system
            out = Path("/sys/relprop-test-out")
        else:
            (tmp_path / "ro").mkdir(mode=0o500)
            out = tmp_path / "ro" / "out"
    elif case == "mps":
        if torch.backends.mps.is_available():
            pytest.skip("this machine has MPS")
        device = "mps"
    else:
        device = "tpu:7"
    code, err = cli(capsys, "explain", image, "--weights", resnet, "--methods", "gradient", "--device",
                    device, "--out", out)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("relprop explain: error: ")
    assert (str(out) in err) if case.startswith("out") else (f"--device {device}" in err)


def test_evaluate_takes_the_devices_explain_takes(resnet, data, tmp_path, capsys):
    code, err = cli(capsys, "evaluate", "--weights", resnet, "--data", data, "--step", "300",
                    "--methods", "gradient", "--device", "cuda:0", "--out", tmp_path / "eval")
    assert "invalid choice" not in err
    if torch.cuda.is_available():
        assert code == 0, err
    else:
        assert code == 1 and err.count("\n") == 1
        assert "--device cuda:0: no CUDA GPU is available here" in err


@pytest.mark.parametrize(("option", "value"), [("--step", "0"), ("--limit", "-1"), ("--limit", "0"),
                                               ("--per-class", "0"), ("--block", "-2")])
def test_evaluate_refuses_bad_counts_before_loading_the_model(tmp_path, capsys, option, value):
    """The weights file does not exist: a count checked first is the one error reported."""
    code, err = cli(capsys, "evaluate", "--weights", tmp_path / "missing.pt", "--data", tmp_path,
                    "--out", tmp_path / "out", option, value)
    assert code == 1 and err.count("\n") == 1, err
    assert f"{option} {value}: must be at least 1" in err


# ---------------------------------------------------------------- 11. progress


def test_evaluate_progress_moves_per_image_and_method(resnet, data, tmp_path):
    result = _evaluate(resnet, data, tmp_path / "eval", "--methods", "gradient,gradcam",
                       env={"TQDM_MININTERVAL": "0"})
    assert result.returncode == 0, result.stderr
    counts = [(int(a), int(b)) for a, b in re.findall(r"(\d+)/(\d+) \[", result.stderr)]
    assert {total for _, total in counts} == {3 * 2}  # 3 images x 2 methods
    assert {done for done, _ in counts} == set(range(7))  # every (image, method) shows


# ---------------------------------------------------------------- 12. --target caveat


def test_target_caveat_is_in_help_and_holds(capsys):
    """The help says the paper's LRP hardly changes with --target; check it on tin10 images."""
    from sharedfiles import shared_path

    with pytest.raises(SystemExit):
        cli(capsys, "explain", "--help")
    help_text = capsys.readouterr().out
    assert "class-discriminative" in help_text and "--target" in help_text
    median = float(re.search(r"at a median of ([0-9.]+)", help_text)[1])
    weights = shared_path("models", "resnet18_tin10.pt")
    images = [next((shared_path("data", "tin10", "val") / wnid).glob("*.JPEG"))
              for wnid in ("n01443537", "n01882714", "n02056570", "n02165456")]
    from relprop.methods import get_method
    from relprop.models import load_model, preprocessing

    model, info = load_model(weights)
    x = torch.stack([preprocessing(info)(Image.open(p).convert("RGB")) for p in images])
    ours = get_method("ours", model)
    pred = model(x).argmax(1)
    base = ours.to_2d(ours.attribute(x, target=pred)).flatten(1).numpy()
    correlations = []
    for k in range(10):
        other = ours.to_2d(ours.attribute(x, target=torch.full_like(pred, k))).flatten(1).numpy()
        correlations += [np.corrcoef(base[i], other[i])[0, 1] for i in range(len(x)) if k != pred[i]]
    assert np.median(correlations) == pytest.approx(median, abs=0.03)
