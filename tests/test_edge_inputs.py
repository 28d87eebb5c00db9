"""Every input validated at the edge (issue 25): --model-def files, targets, images that are no
regular files or hold NaN, input bounds in detect and fit-bow, output names from hostile file
names, models that output NaN, fit-bow's options and forged .bow.npz files, and the CLI's last line
of defence: one line, never a traceback, unless --debug."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import relprop
from relprop.bow import storage
from relprop.cli import main as cli_main
from relprop.cli.main import main
from relprop.errors import CheckpointError, ImageError, TargetError
from relprop.images import MAX_DECODED_PIXELS, load_image
from relprop.modelinfo import ModelInfo, Preprocessing
from relprop.models import load_model
from relprop.pipelines.detect import parse_class
from relprop.pipelines.explain import parse_target

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parent
SRC = Path(relprop.__file__).resolve().parents[1]  # the relprop under test, in the subprocess too

# A tiny classifier whose output is NaN for dark images: sqrt of (mean pixel - 0.5).
TINY_DEF = """\
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, n)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(h) * torch.sqrt(x.mean((1, 2, 3)) - 0.5)[:, None]


def build(meta):
    return Tiny(meta["num_classes"])
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, str]:
    """(weights, --model-def) of the tiny classifier: 3 classes, 16 px, mean 0 / std 1."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "tiny_def.py").write_text(TINY_DEF)
    sys.path.insert(0, str(root))
    try:
        import tiny_def  # the same class the CLI builds
    finally:
        sys.path.remove(str(root))
    torch.manual_seed(0)
    weights = root / "tiny.pt"
    torch.save({"arch": "tiny", "num_classes": 3, "classes": ["a", "b", "c"], "resize": 16,
                "crop": None, "mean": [0.0] * 3, "std": [1.0] * 3,
                "state_dict": tiny_def.Tiny(3).state_dict()}, weights)
    return weights, f"{root / 'tiny_def.py'}:build"


def _image(path: Path, value: int, size: tuple[int, int] = (20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path, format="PNG")
    return path


def _explain(tiny, inputs, out, *extra) -> list[str]:
    weights, model_def = tiny
    return ["explain", *map(str, inputs), "--weights", str(weights), "--model-def", model_def,
            "--methods", "gradient", "--device", "cpu", "--out", str(out), *extra]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line]


# ------------------------------------------------------------------------ --model-def files

MODEL_DEFS = {  # file text -> the line the error must name
    "import torch\nraise RuntimeError('no GPU here')\n": ("importing it failed", 2, "RuntimeError: no GPU here"),
    "def build(meta):\n    return (\n": ("importing it failed", 2, "SyntaxError"),
    "import torch\n\n\ndef build(meta):\n    return torch.nn.Linear(3, meta['width'])\n":
        ("build(metadata) failed", 5, "KeyError: 'width'"),
}


@pytest.mark.parametrize("text", list(MODEL_DEFS))
def test_model_def_errors_name_the_file_and_line(tmp_path, text):
    weights = tmp_path / "w.pt"
    torch.save({"arch": "x", "num_classes": 3, "resize": 8,
                "state_dict": torch.nn.Linear(3, 3).state_dict()}, weights)
    source = tmp_path / "bad_def.py"
    source.write_text(text)
    when, line, reason = MODEL_DEFS[text]
    with pytest.raises(CheckpointError) as caught:
        load_model(weights, model_def=f"{source}:build")
    message = str(caught.value)
    assert f"{when}: {source} line {line}: " in message and reason in message and "\n" not in message


# ------------------------------------------------------------------------ targets

@pytest.mark.parametrize("text", ["²", "٣", "1e3", "\n", "\x00", "-"])
def test_odd_target_strings_are_one_line(text):
    info = ModelInfo("x", 3, ["a", "b", "c"], Preprocessing(8))
    with pytest.raises(TargetError, match="not a class index, id or name"):
        parse_target(text, info)
    with pytest.raises(TargetError, match="not a class index, id or name"):
        parse_class(text, info, ["a", "b", "c"])
    assert parse_target(" 2 ", info) == parse_class("2", info, ["a", "b", "c"]) == 2


# ------------------------------------------------------------------------ images

def test_fifo_and_devices_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            load_image(fifo)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - the test inspects it
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # blocked in open(): release it (a writer appears), then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=5)
        pytest.fail("load_image blocked on a FIFO")
    assert isinstance(outcome[0], ImageError) and "FIFO" in str(outcome[0])
    with pytest.raises(ImageError, match="a device, not an image file"):
        load_image("/dev/zero")


def _release_after(fifo: Path, seconds: float) -> None:
    """Open the FIFO's write end after `seconds` if someone is blocked reading it (then close it:
    the reader sees an empty file and fails); nobody reading is the expected case."""
    def release() -> None:
        for _ in range(10):  # a failing run may block on it more than once
            time.sleep(seconds)
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: no reader, as it should be
                pass
    threading.Thread(target=release, daemon=True).start()


def test_fifo_as_weights_or_classes_is_one_line(tmp_path, capsys):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    _release_after(fifo, seconds=15)
    image = _image(tmp_path / "img.png", 128)
    started = time.time()
    assert main(["detect", str(image), "--weights", str(fifo), "--out", str(tmp_path / "a")]) == 1
    assert main(["explain", str(image), "--weights", str(fifo), "--classes", str(fifo),
                 "--arch", "resnet18", "--out", str(tmp_path / "b")]) == 1
    assert time.time() - started < 12  # never blocked (released after 15 s otherwise)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"relprop detect: error: {fifo}: not a regular file, so not a weights file",
                     f"relprop explain: error: --classes {fifo}: not a regular file"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_float_tiff_with_a_non_finite_pixel_is_refused(tmp_path, bad):
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(values, mode="F").save(tmp_path / "ok.tif")
    assert np.asarray(load_image(tmp_path / "ok.tif")).max() == 255  # the control: scaled, not black
    values[3, 3] = bad
    Image.fromarray(values, mode="F").save(tmp_path / "bad.tif")
    with pytest.raises(ImageError, match=r"bad.tif: 1 pixel\(s\) are NaN or infinite"):
        load_image(tmp_path / "bad.tif")


def test_decoded_pixel_bound_is_checked_before_decoding(tmp_path, monkeypatch):
    side = int(MAX_DECODED_PIXELS ** 0.5) + 1
    path = tmp_path / "huge.png"
    Image.new("L", (side, side)).save(path)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a refused image"))
    with pytest.raises(ImageError, match=f"huge.png: {side}x{side} = .* above this command's limit"):
        load_image(path, MAX_DECODED_PIXELS)


def test_explain_goes_on_past_a_fifo_and_a_nan_tiff(tiny, tmp_path, capsys):
    good = _image(tmp_path / "in" / "good.png", 230)
    os.mkfifo(tmp_path / "in" / "pipe.png")
    _release_after(tmp_path / "in" / "pipe.png", seconds=30)  # a reader stuck on it fails, not hangs
    values = np.full((16, 16), 0.9, dtype=np.float32)
    values[0, 0] = np.nan
    Image.fromarray(values, mode="F").save(tmp_path / "in" / "nan.tif")
    inputs = [tmp_path / "in" / "pipe.png", tmp_path / "in" / "nan.tif", good]
    started = time.time()
    code = main(_explain(tiny, inputs, tmp_path / "out"))
    assert time.time() - started < 25  # the FIFO is never opened (released after 30 s otherwise)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert len(_error_lines(err)) == 2 and "2 of 3 inputs failed" in err
    assert (tmp_path / "out" / "good" / "gradient.npy").is_file()


# ------------------------------------------------------------------------ output names

@pytest.mark.parametrize("name", ["..png", "...png", "a\nb.png"])
def test_output_names_stay_inside_out(tiny, tmp_path, capsys, name):
    out = tmp_path / "work" / "out"
    parent_before = set((tmp_path / "work").glob("*")) if (tmp_path / "work").exists() else set()
    image = _image(tmp_path / "in" / name, 230)
    assert main(_explain(tiny, [image], out)) == 0, capsys.readouterr().err
    written = {p for p in (tmp_path / "work").rglob("*")}
    assert all(p == out or p.is_relative_to(out) for p in written - parent_before)
    record = json.loads((out / "predictions.jsonl").read_text())
    folder = out / record["output"]
    assert folder.parent == out and (folder / "gradient.npy").is_file()
    assert "\n" not in record["output"] and record["output"] not in (".", "..")


# ------------------------------------------------------------------------ NaN outputs

def test_explain_refuses_an_image_whose_output_is_nan_and_goes_on(tiny, tmp_path, capsys):
    dark = _image(tmp_path / "dark.png", 10)  # sqrt(mean - 0.5) is NaN
    light = _image(tmp_path / "light.png", 230)
    code = main(_explain(tiny, [dark, light], tmp_path / "out", "--batch-size", "2"))
    captured = capsys.readouterr()
    assert code == 1 and "nan%" not in captured.out.lower()
    assert _error_lines(captured.err) == [f"relprop explain: error: {dark}: the model's output is NaN "
                                          "or infinite for this image (check the weights); not explained"]
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in records] == ["light.png"]
    assert np.isfinite(np.load(tmp_path / "out" / "light" / "gradient.npy")).all()


def _tiny_ssd_checkpoint(tmp_path: Path, nan: bool) -> tuple[Path, str]:
    sys.path.insert(0, str(TESTS))
    from ssd_helpers import tiny_ssd
    model = tiny_ssd(num_classes=3)
    state = model.state_dict()
    if nan:
        state = {k: v.clone().fill_(float("nan")) if k.endswith("weight") and "head" in k else v
                 for k, v in state.items()}
    weights = tmp_path / "ssd.pt"
    torch.save({"arch": "tiny_ssd", "num_classes": 3, "input_size": 64,
                "classes": ["__background__", "a", "b"], "state_dict": state}, weights)
    builder = tmp_path / "ssd_def.py"
    builder.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom ssd_helpers import tiny_ssd\n\n"
                       "def build(meta):\n    return tiny_ssd(num_classes=meta['num_classes'])\n")
    return weights, f"{builder}:build"


def test_detect_refuses_nan_output_and_oversized_images(tmp_path, capsys):
    weights, model_def = _tiny_ssd_checkpoint(tmp_path, nan=True)
    image = _image(tmp_path / "in" / "img.png", 128, (64, 48))
    side = int(MAX_DECODED_PIXELS ** 0.5) + 1
    Image.new("L", (side, side)).save(tmp_path / "in" / "huge.png")
    code = main(["detect", str(image), str(tmp_path / "in" / "huge.png"), "--weights", str(weights),
                 "--model-def", model_def, "--device", "cpu", "--out", str(tmp_path / "out"),
                 "--score-threshold", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    lines = _error_lines(err)
    assert lines[0] == (f"relprop detect: error: {image}: the detector's output is NaN or infinite "
                        "for this image (check the weights); not explained")
    assert "huge.png" in lines[1] and "above this command's limit" in lines[1]
    assert (tmp_path / "out" / "detections.jsonl").read_text() == ""


def test_detect_target_class_superscript_is_one_line(tmp_path, capsys):
    weights, model_def = _tiny_ssd_checkpoint(tmp_path, nan=False)
    image = _image(tmp_path / "img.png", 128, (64, 48))
    code = main(["detect", str(image), "--weights", str(weights), "--model-def", model_def,
                 "--device", "cpu", "--out", str(tmp_path / "out"), "--target-class", "²"])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "relprop detect: error: --target-class '²': not a class index, id or name of this detector"]


# ------------------------------------------------------------------------ fit-bow

@pytest.fixture(scope="module")
def bow_data(tmp_path_factory) -> Path:
    """two/ (2 classes x 3 noise images), one/ (1 class), broken/ (2 classes of junk), wide/."""
    root = tmp_path_factory.mktemp("bowdata")
    rng = np.random.default_rng(0)

    def noise(path: Path, shape=(40, 48, 3)) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)

    for c in ("a", "b"):
        for i in range(3):
            noise(root / "two" / c / f"{i}.png")
        (root / "broken" / c).mkdir(parents=True)
        (root / "broken" / c / "x.png").write_bytes(b"junk")
        noise(root / "wide" / c / "ok.png")
    noise(root / "wide" / "a" / "strip.png", (1, 1250, 3))
    for i in range(3):
        noise(root / "one" / "a" / f"{i}.png")
    return root


FIT = ["--words", "4", "--size", "32"]


@pytest.mark.parametrize(("folder", "extra", "words"), [
    ("one", [], "one class ('a'); a classifier needs at least two"),
    ("broken", [], "no readable training image"),
    ("two", ["--C", "nan"], "--C nan: must be a finite number above 0"),
    ("two", ["--gamma", "nan", "--kernel", "rbf"], "--gamma nan: must be a finite number above 0"),
    ("two", ["--size", "20000"], "--size 20000: every image would be at least 20000x20000 pixels"),
])
def test_fit_bow_bad_data_or_options_is_one_line(bow_data, tmp_path, capsys, folder, extra, words):
    code = main(["fit-bow", str(bow_data / folder), *FIT, *extra, "--out", str(tmp_path / "m.bow.npz")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("relprop fit-bow: error: ") and words in err


@pytest.mark.parametrize("out", ["folder", "file/m.bow.npz"])
def test_fit_bow_bad_out_is_refused_before_fitting(bow_data, tmp_path, capsys, out):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    code = main(["fit-bow", str(bow_data / "two"), *FIT, "--out", str(tmp_path / out)])
    err = capsys.readouterr().err
    assert code == 1 and err.strip().splitlines() == [err.strip()] and f"--out {tmp_path / out}" in err
    assert "local features" not in err  # refused before the fit started


def test_fit_bow_skips_an_image_beyond_the_input_bound(bow_data, tmp_path, capsys):
    assert main(["fit-bow", str(bow_data / "wide"), *FIT, "--out", str(tmp_path / "m.bow.npz")]) == 0
    skipped = [line for line in capsys.readouterr().err.splitlines() if "skipping" in line]
    assert len(skipped) == 1 and "strip.png: 1250x1 pixels: aspect ratio 1250:1" in skipped[0]


def _forge(source: Path, target: Path, change) -> None:
    """Edit a .bow.npz and recompute its hash, as anyone can."""
    with np.load(source, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    header = json.loads(str(arrays.pop(storage.HEADER)))
    change(arrays, header)
    header["sha256"] = storage._digest(arrays, header)
    with open(target, "wb") as handle:
        np.savez(handle, **arrays, **{storage.HEADER: np.array(json.dumps(header))})


def _nan_coef(arrays, header):
    arrays["coef"] = arrays["coef"].copy()
    arrays["coef"][0, 0] = np.nan


FORGERIES = {
    "centres": (lambda a, h: a.update(centres=a["centres"][:, :100]), "centres has shape (4, 100)"),
    "coef": (_nan_coef, "coef holds NaN or infinite values"),
    "classes": (lambda a, h: a.update(classes=np.array(["a", "b", "c"])), "coef has shape (2, "),
    "gamma": (lambda a, h: h.update(gamma=float("inf")), "gamma inf is not a finite number"),
}


@pytest.mark.parametrize("kind", sorted(FORGERIES))
def test_forged_bow_file_with_a_fresh_hash_is_refused(bow_data, tmp_path, kind):
    model = tmp_path / "m.bow.npz"
    assert main(["fit-bow", str(bow_data / "two"), *FIT, "--out", str(model)]) == 0
    storage.load(model)  # the control: the file as written loads
    change, words = FORGERIES[kind]
    forged = tmp_path / "forged.bow.npz"
    _forge(model, forged, change)
    with pytest.raises(CheckpointError, match="inconsistent BoW model file") as caught:
        load_model(forged)
    assert words in str(caught.value)


# ------------------------------------------------------------------------ the CLI's last line

def _failing_run(error: BaseException):
    def run(args):
        raise error
    return run


@pytest.mark.parametrize(("error", "code", "line"), [
    (KeyError("x"), 3, "relprop compare: internal error: KeyError: 'x' (rerun with --debug for the "
                       "traceback)"),
    (OSError(28, "No space left on device", "/run/out/summary.md"), 1,
     "relprop compare: error: /run/out/summary.md: No space left on device"),
    (CheckpointError("a.pt: bad\nsecond line"), 1, "relprop compare: error: a.pt: bad second line"),
])
def test_any_error_is_one_line_without_traceback(monkeypatch, capsys, tmp_path, error, code, line):
    monkeypatch.delenv("RELPROP_DEBUG", raising=False)
    parser = cli_main.build_parser()
    monkeypatch.setattr(cli_main, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["compare"].set_defaults(run=_failing_run(error))
    assert main(["compare", str(tmp_path), "--baseline", "ours"]) == code
    assert capsys.readouterr().err.splitlines() == [line]


@pytest.mark.parametrize("how", ["flag-before", "flag-after", "env"])
def test_debug_shows_the_traceback(monkeypatch, capsys, tmp_path, how):
    monkeypatch.delenv("RELPROP_DEBUG", raising=False)
    parser = cli_main.build_parser()
    monkeypatch.setattr(cli_main, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["compare"].set_defaults(run=_failing_run(KeyError("x")))
    argv = ["compare", str(tmp_path), "--baseline", "ours"]
    if how == "env":
        monkeypatch.setenv("RELPROP_DEBUG", "1")
    else:
        argv = ["--debug", *argv] if how == "flag-before" else [*argv, "--debug"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "in run\n    raise error" in err
    assert err.splitlines()[-1] == "relprop compare: internal error: KeyError: 'x'"


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4_000, 4_000))


def test_a_full_disk_in_explain_is_one_line_naming_out(tiny, tmp_path):
    """A file-size limit stands in for a full disk: a write fails with an OSError part-way."""
    image = _image(tmp_path / "in" / "a.png", 230, (200, 160))
    out = tmp_path / "out"
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "relprop", *_explain(tiny, [image], out)],
                            capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size,
                            env={**os.environ, "PYTHONPATH": str(SRC), "RELPROP_DEBUG": ""})
    assert time.time() - started < 300
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("relprop explain: error: ") and "File too large" in last
    assert str(out) in last
