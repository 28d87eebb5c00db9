"""`relprop explain` end to end on the shared ResNet-18: any image in, the right files out."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from relprop.cli.main import main

from sharedfiles import load_torchvision_checkpoint, shared_path

PENGUIN = ("n02056570", "val_1073.JPEG")
KOALA = ("n01882714", "val_1083.JPEG")
METHODS = ("ours", "gradcam", "gradient")


def _reference(path: Path) -> tuple[torch.nn.Module, dict, transforms.Compose]:
    """The model and its preprocessing, built here without relprop (README's recipe)."""
    meta = torch.load(path, weights_only=True)
    steps = transforms.Compose([transforms.Resize(meta["resize"]), transforms.ToTensor(),
                                transforms.Normalize(meta["mean"], meta["std"])])
    return load_torchvision_checkpoint(path), meta, steps


def _variants(source: Path, folder: Path) -> dict[str, Path]:
    """The same photo as RGBA PNG, CMYK JPEG, 16-bit grey PNG, EXIF-rotated and wide JPEG."""
    folder.mkdir(parents=True)
    img = Image.open(source).convert("RGB")
    paths = {name: folder / name for name in
             ("rgba.png", "cmyk.jpg", "grey16.png", "rotated.jpg", "wide.jpg", "broken.jpg")}
    rgba = img.convert("RGBA")
    rgba.putalpha(255)
    rgba.save(paths["rgba.png"])
    img.convert("CMYK").save(paths["cmyk.jpg"], quality=95)
    grey = np.asarray(img.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(paths["grey16.png"])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned left; the viewer turns it right again
    img.transpose(Image.Transpose.ROTATE_90).save(paths["rotated.jpg"], exif=exif.tobytes(), quality=95)
    img.resize((96, 64)).save(paths["wide.jpg"], quality=95)
    paths["broken.jpg"].write_bytes(source.read_bytes()[:200])
    return paths


@pytest.fixture(scope="module")
def explained(tmp_path_factory: pytest.TempPathFactory):
    weights = shared_path("models", "resnet18_tin10.pt")
    penguin = shared_path("data", "tin10", "val", *PENGUIN)
    koala = shared_path("data", "tin10", "val", *KOALA)
    root = tmp_path_factory.mktemp("explain")
    variants = _variants(penguin, root / "in")
    out = root / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["explain", str(penguin), str(koala), str(root / "in"), "--weights", str(weights),
                     "--methods", ",".join(METHODS), "--batch-size", "4", "--device", "cpu",
                     "--out", str(out)])
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return code, out, {Path(r["image"]).name: r for r in records}, variants, weights, err.getvalue()


def test_bad_file_is_one_line_and_the_others_are_explained(explained) -> None:
    code, out, records, variants, _, err = explained
    assert code == 1
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and str(variants["broken.jpg"]) in errors[0]
    assert "1 of 8 inputs failed" in err
    assert set(records) == {PENGUIN[1], KOALA[1], "rgba.png", "cmyk.jpg", "grey16.png",
                            "rotated.jpg", "wide.jpg"}
    for record in records.values():
        folder = out / record["output"]
        for name in ("panel.png", "original.png", *(f"{m}.png" for m in METHODS)):
            assert Image.open(folder / name).size[0] > 0
        assert (out / "overview.png").is_file()


def test_predictions_match_the_model(explained) -> None:
    _, _, records, variants, weights, _ = explained
    model, meta, steps = _reference(weights)
    for name, path in ((PENGUIN[1], shared_path("data", "tin10", "val", *PENGUIN)),
                       (KOALA[1], shared_path("data", "tin10", "val", *KOALA)),
                       ("wide.jpg", variants["wide.jpg"])):
        with torch.no_grad():
            probs = model(steps(Image.open(path).convert("RGB"))[None]).softmax(1)[0]
        record = records[name]
        assert record["pred"] == int(probs.argmax())
        assert record["pred_name"] == meta["class_names"][record["pred"]]
        assert record["prob"] == pytest.approx(float(probs.max()), abs=1e-4)
        assert record["target"] == record["pred"]
    assert records[PENGUIN[1]]["pred_name"] == "king penguin"
    assert records[KOALA[1]]["pred_name"] == "koala"


def test_maps_are_the_registry_maps_of_each_image(explained) -> None:
    """Batches of mixed sizes must not mix images up: each map equals a one-image run."""
    _, out, records, variants, weights, _ = explained
    from relprop.methods import get_method

    model, meta, steps = _reference(weights)
    for name, path in (("wide.jpg", variants["wide.jpg"]),
                       (KOALA[1], shared_path("data", "tin10", "val", *KOALA))):
        x = steps(Image.open(path).convert("RGB"))[None]
        for method in ("gradcam", "gradient"):
            expected = get_method(method, model).attribute(x)[0].sum(0).detach().numpy()
            saved = np.load(out / records[name]["output"] / f"{method}.npy")
            assert saved.dtype == np.float32 and saved.shape == x.shape[2:]
            np.testing.assert_allclose(saved, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_every_image_format_gives_the_same_picture(explained) -> None:
    _, out, records, _, _, _ = explained

    def original(name: str) -> np.ndarray:
        return np.asarray(Image.open(out / records[name]["output"] / "original.png"), dtype=float)

    plain = original(PENGUIN[1])
    for name in ("rgba.png", "cmyk.jpg", "rotated.jpg"):
        assert np.abs(original(name) - plain).mean() < 6, name
        assert records[name]["pred"] == records[PENGUIN[1]]["pred"]
    grey = original("grey16.png")
    assert np.abs(grey - plain.mean(-1, keepdims=True)).mean() < 12  # 16-bit scaled, not clipped
    turned = np.rot90(plain, k=1)
    assert np.abs(original("rotated.jpg") - plain).mean() < np.abs(turned - plain).mean() / 3
    assert original("wide.jpg").shape == (112, 168, 3)


def test_target_by_name(tmp_path: Path) -> None:
    weights = shared_path("models", "resnet18_tin10.pt")
    penguin = shared_path("data", "tin10", "val", *PENGUIN)
    assert main(["explain", str(penguin), "--weights", str(weights), "--methods", "gradient",
                 "--target", "Teapot", "--sign", "positive", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "predictions.jsonl").read_text())
    assert record["target_name"] == "teapot" and record["pred_name"] == "king penguin"
    assert 0 < record["target_prob"] < record["prob"]
    from relprop.methods import get_method

    model, _, steps = _reference(weights)
    x = steps(Image.open(penguin).convert("RGB"))[None]
    expected = get_method("gradient", model).attribute(x, target=record["target"])[0].sum(0)
    np.testing.assert_allclose(np.load(tmp_path / "val_1073" / "gradient.npy"),
                               expected.detach().numpy(), rtol=1e-4, atol=1e-8)


def test_out_defaults_to_explained_in_the_working_folder(tmp_path: Path, monkeypatch) -> None:
    """`relprop explain photo.jpg` needs no --out (the README's first command)."""
    weights = shared_path("models", "resnet18_tin10.pt")
    (tmp_path / "photo.jpg").write_bytes(shared_path("data", "tin10", "val", *PENGUIN).read_bytes())
    monkeypatch.chdir(tmp_path)
    assert main(["explain", "photo.jpg", "--weights", str(weights), "--methods", "gradient"]) == 0
    assert (tmp_path / "explained" / "photo" / "gradient.npy").is_file()
    assert json.loads((tmp_path / "explained" / "predictions.jsonl").read_text())["pred_name"] == "king penguin"


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--methods", "ours,nonsense", "unknown method 'nonsense'"),
    ("--target", "giraffe", "--target 'giraffe'"),
    ("--target", "10", "classes 0..9"),
])
def test_bad_options_are_one_clear_line(tmp_path: Path, capsys, option: str, value: str,
                                        message: str) -> None:
    weights = shared_path("models", "resnet18_tin10.pt")
    args = ["explain", str(tmp_path), "--weights", str(weights), "--out", str(tmp_path / "o"),
            option, value]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_empty_folder_is_reported(tmp_path: Path, capsys) -> None:
    weights = shared_path("models", "resnet18_tin10.pt")
    (tmp_path / "empty").mkdir()
    assert main(["explain", str(tmp_path / "empty"), "--weights", str(weights), "--methods",
                 "gradient", "--out", str(tmp_path / "o")]) == 1
    assert "no image files" in capsys.readouterr().err


def test_help_reads_like_a_man_page(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    text = capsys.readouterr().out
    for part in ("IMAGE_OR_DIR", "--weights CKPT", "--model-def", "--sign", "panel.png",
                 "examples:", "exit status:", "decompression bomb"):
        assert part in text
