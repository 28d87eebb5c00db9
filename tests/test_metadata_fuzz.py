"""Checkpoint metadata is untrusted input: every bad value is one `CheckpointError` line naming the
key (and, through `load_model`, the file), never a traceback from int(), float() or torchvision;
a hypothesis fuzz of the readers holds it for any JSON-like values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchvision.transforms import InterpolationMode

from relprop.errors import CheckpointError, RelpropError
from relprop.modelinfo import INTERPOLATIONS, ModelInfo, Preprocessing
from relprop.models import _info, load_model, preprocessing

GOOD = {"arch": "tiny", "num_classes": 3, "classes": ["a", "b", "c"], "resize": 16, "crop": None,
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
TINY_DEF = "import torch\n\ndef build(meta):\n    return torch.nn.Linear(3, meta['num_classes'])\n"


@pytest.fixture()
def checkpoint(tmp_path: Path):
    """save(**changes) -> (weights file, --model-def) of a Linear(3, 3) with GOOD metadata changed."""
    builder = tmp_path / "tiny_def.py"
    builder.write_text(TINY_DEF)

    def save(**changes) -> tuple[Path, str]:
        path = tmp_path / "ckpt.pt"
        torch.save({**GOOD, "state_dict": torch.nn.Linear(3, 3).state_dict(), **changes}, path)
        return path, f"{builder}:build"
    return save


BAD = {  # key changed -> words the refusal must contain
    "num_classes": ("ten", "num_classes 'ten'"),
    "std": ([0.2, 0.0, 0.2], "std [0.2, 0.0, 0.2]: values must be above 0"),
    "resize": (0, "resize 0"),
    "interpolation": ("cubicish", "interpolation 'cubicish': choose one of"),
    "classes": (["a", "b"], "classes: 2 class ids for a model with 3 classes"),
    "mean": ([math.nan, 0.0, 0.0], "mean [nan, 0.0, 0.0]: values must be finite"),
    "crop": (32, "crop 32 is larger than resize 16"),  # CenterCrop would pad with black
    "class_names": ("abc", "class_names 'abc': must be a list of 3 names"),
    "input_size": ([-1, 3], "input_size [-1, 3]"),
}


@pytest.mark.parametrize("key", sorted(BAD))
def test_bad_metadata_is_one_line_naming_file_and_key(checkpoint, key):
    value, words = BAD[key]
    path, model_def = checkpoint(**{key: value})
    with pytest.raises(CheckpointError) as caught:
        load_model(path, model_def=model_def)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message


@pytest.mark.parametrize("resize", [-5, "big", 64.5, [[1]], [1, 2, 3], 10**12, True])
def test_resize_that_is_no_size_is_refused(checkpoint, resize):
    path, model_def = checkpoint(resize=resize)
    with pytest.raises(CheckpointError, match=r"resize .*: must be a whole number of pixels"):
        load_model(path, model_def=model_def)


def test_state_dict_of_non_tensors_is_refused(checkpoint):
    path, model_def = checkpoint(state_dict={"weight": [[1.0, 2.0, 3.0]] * 3, "bias": [0.0] * 3})
    with pytest.raises(CheckpointError, match="state_dict entry 'weight' is a list, not a tensor"):
        load_model(path, model_def=model_def)


def test_good_metadata_loads_as_stored(checkpoint):
    """The control: the same file with valid values (a tensor mean, an integral float resize)."""
    path, model_def = checkpoint(mean=torch.tensor([0.4, 0.5, 0.6]), resize=16.0, crop=12)
    _, info = load_model(path, model_def=model_def)
    assert (info.num_classes, info.classes, info.preprocessing.resize, info.preprocessing.crop) == \
        (3, ["a", "b", "c"], 16, 12)
    assert info.mean == pytest.approx((0.4, 0.5, 0.6))


def test_interpolations_are_torchvisions():
    assert set(INTERPOLATIONS) == {mode.value for mode in InterpolationMode}
    for name in INTERPOLATIONS:  # each builds the transform
        preprocessing(Preprocessing(8, interpolation=name))


def test_crop_within_resize_is_kept_and_larger_refused():
    assert Preprocessing((20, 30), (20, 30)).crop == (20, 30)
    assert Preprocessing(16, 0).crop == 0  # 0: no crop
    for resize, crop in ((16, 17), ((20, 30), 21), (16, (8, 17))):
        with pytest.raises(CheckpointError, match="is larger than resize"):
            Preprocessing(resize, crop)


# ------------------------------------------------------------------------------ the fuzz

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
KEYS = ("arch", "num_classes", "classes", "class_names", "input_size", "resize", "crop", "mean",
        "std", "interpolation", "path", "weights", "url", "assumed")
# Half the time a key keeps a plausible value, so the fuzz reaches the checks after the first.
PLAUSIBLE = {"arch": st.just("resnet18"), "num_classes": st.just(3), "resize": st.sampled_from([16, [16, 20]]),
             "classes": st.just(["a", "b", "c"]), "mean": st.just([0.1, 0.2, 0.3]),
             "std": st.just([0.5, 0.5, 0.5])}
METADATA = st.fixed_dictionaries({}, optional={
    key: (PLAUSIBLE[key] | JSONISH) if key in PLAUSIBLE else JSONISH for key in KEYS})


def _one_line(error: RelpropError) -> None:
    text = str(error)
    assert text.strip() and "\n" not in text and len(text) < 400


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(METADATA)
def test_model_info_from_any_dict_is_a_model_info_or_one_line(data):
    try:
        info = ModelInfo.from_dict(data)
    except CheckpointError as error:
        _one_line(error)
        return
    assert 1 <= info.num_classes and len(info.classes) == info.num_classes
    assert all(math.isfinite(v) for v in info.mean) and all(v > 0 for v in info.std)
    assert ModelInfo.from_dict(info.to_dict()) == info  # what was accepted round-trips


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(METADATA)
def test_checkpoint_reader_on_any_metadata_is_a_model_info_or_one_line(data):
    """`load_model`'s reader of a checkpoint's keys (no model is built: that is torchvision's)."""
    given_ = dict.fromkeys(("arch", "num_classes", "resize", "crop", "mean", "std", "classes",
                            "class_names"))
    try:
        info = _info(Path("ckpt.pt"), dict(data), given_, {"fc.weight": torch.zeros(3, 2)}, None, None)
    except CheckpointError as error:
        _one_line(error)
        assert str(error).startswith("ckpt.pt: ")
        return
    assert isinstance(info, ModelInfo) and len(info.classes) == info.num_classes
