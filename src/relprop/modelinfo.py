"""What a loaded classifier is and how its inputs are made: `ModelInfo`, in the spirit of timm's
`PretrainedCfg`.

`relprop.models.load_model` returns `(model, ModelInfo)`. Everything that needs to know the
model's classes, its preprocessing or where its weights came from reads these attributes; no
package passes the model's metadata as a dict. The one dict form is `ModelInfo.to_dict()`: the
keys of a relprop checkpoint (docs/checkpoints.md) plus where the weights came from. It is what a
`--model-def FILE.py:FUNCTION` builder receives, so such files need no relprop import.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from relprop.defaults import IMAGENET_MEAN, IMAGENET_STD
from relprop.errors import CheckpointError

PREPROCESSING_KEYS = ("resize", "crop", "mean", "std")
# The keys of a relprop checkpoint, in the order docs/checkpoints.md lists them: here, below both
# the loader (models.py) and the writer (checkpoints.py).
CHECKPOINT_KEYS = ("arch", "num_classes", "classes", "class_names", "input_size", "resize", "crop",
                   "mean", "std", "interpolation", "state_dict")
# torchvision's InterpolationMode values (tests/test_edge_inputs.py checks the list against it):
# spelled out so that this module stays torch-free.
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
MAX_SIDE = 1 << 16  # a resize, crop or input size above 65,536 pixels is no image model's
MAX_CLASSES = 1_000_000  # a larger num_classes would allocate a multi-GB last layer before any check

Size = int | tuple[int, ...]


@dataclass(frozen=True)
class Preprocessing:
    """`Resize(resize)` -> `CenterCrop(crop)` if crop -> `ToTensor` -> `Normalize(mean, std)`.

    `resize` is the shorter side (an int) or an exact (height, width); `crop` None or 0 means no
    crop. `relprop.models.preprocessing(p)` builds the torchvision transform.
    """

    resize: Size
    crop: Size | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        """Check every value (a `CheckpointError` line naming the key): a checkpoint's metadata is
        untrusted input, and a zero std or a crop larger than the resize gives wrong maps quietly."""
        resize = _size(self.resize, "resize")
        crop = None if self.crop is None else _size(self.crop, "crop", zero_means_none=True)
        object.__setattr__(self, "resize", resize)
        object.__setattr__(self, "crop", crop)
        object.__setattr__(self, "mean", _channels(self.mean, "mean"))
        object.__setattr__(self, "std", _channels(self.std, "std", positive=True))
        if self.interpolation not in INTERPOLATIONS:
            raise CheckpointError(f"interpolation {_show(self.interpolation)}: choose one of "
                                  f"{', '.join(INTERPOLATIONS)}")
        _check_crop_fits(resize, crop)

    @property
    def input_size(self) -> Size:
        """The size of the model input: the crop, else the resize."""
        return self.crop or self.resize

    def to_dict(self) -> dict[str, Any]:
        """resize, crop, mean, std (the checkpoint's keys, lists for sequences) and interpolation."""
        return {"resize": plain_size(self.resize), "crop": plain_size(self.crop), "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        if "resize" not in data:
            raise CheckpointError("model metadata has no 'resize'")
        mean, std = data.get("mean"), data.get("std")
        return cls(data["resize"], data.get("crop"), IMAGENET_MEAN if mean is None else mean,
                   IMAGENET_STD if std is None else std, data.get("interpolation") or "bilinear")


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights came from: the file read and, for torchvision weights, their name and URL."""

    path: str
    name: str | None = None  # e.g. ResNet50_Weights.IMAGENET1K_V2
    url: str | None = None

    @cached_property
    def sha256(self) -> str:
        """The file's hash (computed on first use): results are keyed by it."""
        return file_sha256(self.path)

    @property
    def label(self) -> str:
        """The torchvision weights name, else the file."""
        return self.name or self.path


@dataclass(frozen=True)
class ModelInfo:
    """A classifier's architecture, classes, preprocessing and the source of its weights.

    `classes` are the ids in index order (wnids, or the indices as strings); `class_names` the
    readable names where known. `assumed` names the preprocessing settings nothing gave (a plain
    state dict without --resize, --crop, --mean, --std): relprop's defaults stand in for them.
    """

    arch: str
    num_classes: int
    classes: list[str]
    preprocessing: Preprocessing
    class_names: list[str] | None = None
    input_size: Size | None = None  # the checkpoint's own value; default the preprocessing's
    source: WeightsSource | None = None
    assumed: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # other stored keys

    def __post_init__(self) -> None:
        """Check the metadata (one `CheckpointError` line naming the key; see `Preprocessing`)."""
        if not isinstance(self.arch, str) or not self.arch:
            raise CheckpointError(f"arch {_show(self.arch)}: must be a non-empty name")
        object.__setattr__(self, "num_classes", class_count(self.num_classes))
        object.__setattr__(self, "classes", _labels(self.classes, "classes", self.num_classes))
        if self.class_names is not None:
            object.__setattr__(self, "class_names",
                               _labels(self.class_names, "class_names", self.num_classes))
        if not isinstance(self.preprocessing, Preprocessing):
            raise CheckpointError(f"preprocessing {_show(self.preprocessing)}: not a Preprocessing")
        if self.input_size is None:
            object.__setattr__(self, "input_size", self.preprocessing.input_size)
        else:
            object.__setattr__(self, "input_size", _size(self.input_size, "input_size", longest=3))

    @property
    def mean(self) -> tuple[float, ...]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.preprocessing.std

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's keys (arch, num_classes, classes, class_names, input_size, resize, crop,
        mean, std, interpolation), then path, weights, url and assumed where known."""
        data: dict[str, Any] = {"arch": self.arch, "num_classes": self.num_classes,
                                "classes": list(self.classes),
                                "class_names": None if self.class_names is None else list(self.class_names),
                                "input_size": plain_size(self.input_size), **self.preprocessing.to_dict()}
        if self.source is not None:
            data.update(path=self.source.path, weights=self.source.name, url=self.source.url)
        data["assumed"] = list(self.assumed)
        return {**self.extra, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelInfo:
        """The inverse of `to_dict` (keys it does not know are kept in `extra`); anything else than
        such a dict is one `CheckpointError` line."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"model metadata must be a dict, got {type(data).__name__}")
        known = {"arch", "num_classes", "classes", "class_names", "input_size", "path", "weights",
                 "url", "assumed", *PREPROCESSING_KEYS, "interpolation"}
        for key in ("arch", "num_classes", "resize"):
            if key not in data:
                raise CheckpointError(f"model metadata has no {key!r}")
        count = class_count(data["num_classes"])
        path, assumed = data.get("path"), data.get("assumed") or ()
        if not isinstance(assumed, list | tuple) or not all(isinstance(a, str) for a in assumed):
            raise CheckpointError(f"assumed {_show(assumed)}: must be a list of option names")
        return cls(
            arch=data["arch"], num_classes=count,
            classes=data.get("classes") or [str(c) for c in range(count)],
            preprocessing=Preprocessing.from_dict(data),
            class_names=data.get("class_names"),
            input_size=data.get("input_size"),
            source=None if path is None else WeightsSource(str(path), _text_or_none(data, "weights"),
                                                           _text_or_none(data, "url")),
            assumed=tuple(assumed),
            extra={k: v for k, v in data.items() if k not in known},
        )


def as_preprocessing(spec: Preprocessing | ModelInfo) -> Preprocessing:
    """The preprocessing of a model, or the preprocessing itself."""
    return spec.preprocessing if isinstance(spec, ModelInfo) else spec


def _show(value: Any) -> str:
    """A value for an error line: its repr, cut short (metadata can hold anything)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _whole(value: Any) -> int | None:
    """An int, an integral float, or a string of ASCII digits as an int; None for anything else
    (bools included: `True` is no size)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,12}", value.strip()):
        return int(value.strip())
    return None


def _size(size: Any, key: str, *, zero_means_none: bool = False, longest: int = 2) -> Size:
    """A size in pixels: an int, or a list of 1..`longest` ints, each in 1..MAX_SIDE (0 also, for
    a crop, where it means no crop)."""
    values = size if isinstance(size, list | tuple) else [size]
    whole = [_whole(v) for v in values]
    lowest = 0 if zero_means_none and not isinstance(size, list | tuple) else 1
    if not 1 <= len(values) <= longest or any(w is None or not lowest <= w <= MAX_SIDE for w in whole):
        raise CheckpointError(f"{key} {_show(size)}: must be a whole number of pixels in 1..{MAX_SIDE} "
                              f"or a list of 1 to {longest} of them")
    return tuple(whole) if isinstance(size, list | tuple) else whole[0]  # type: ignore[return-value]


def _channels(values: Any, key: str, *, positive: bool = False) -> tuple[float, ...]:
    """Three finite floats, one per RGB channel (positive for a std: Normalize divides by it)."""
    if isinstance(values, str | bytes) or not isinstance(values, list | tuple) or len(values) != 3:
        raise CheckpointError(f"{key} {_show(values)}: needs 3 values (one per RGB channel)")
    floats = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise CheckpointError(f"{key} {_show(values)}: values must be finite numbers")
        if positive and value <= 0:
            raise CheckpointError(f"{key} {_show(values)}: values must be above 0 "
                                  "(Normalize divides by them)")
        floats.append(float(value))
    return tuple(floats)


def class_count(value: Any) -> int:
    """`num_classes` as an int in 1..MAX_CLASSES, or one `CheckpointError` line."""
    count = _whole(value)
    if count is None or not 1 <= count <= MAX_CLASSES:
        raise CheckpointError(f"num_classes {_show(value)}: must be a whole number in 1..{MAX_CLASSES:,}")
    return count


def _labels(values: Any, key: str, count: int) -> list[str]:
    """Class ids or names: a list of `count` strings (ints are taken as their text)."""
    if isinstance(values, str | bytes) or not isinstance(values, list | tuple):
        raise CheckpointError(f"{key} {_show(values)}: must be a list of {count} names")
    if len(values) != count:
        what = "class ids" if key == "classes" else "class names"
        raise CheckpointError(f"{key}: {len(values)} {what} for a model with {count} classes")
    bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, str | int)), None)
    if bad is not None:
        raise CheckpointError(f"{key}: entry {_show(bad)} is not a name")
    return [str(v) for v in values]


def _text_or_none(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{key} {_show(value)}: must be text")
    return value


def _check_crop_fits(resize: Size, crop: Size | None) -> None:
    """Refuse a crop larger than the resized image: CenterCrop would pad it with black, a border
    the model never saw in training and the maps would explain. With an int resize (the shorter
    side) an image in one orientation or the other is padded as soon as a crop side exceeds it."""
    if not crop:
        return
    crop_hw = (crop, crop) if isinstance(crop, int) else (tuple(crop) * 2)[:2]
    if isinstance(resize, int) or len(resize) == 1:
        side = resize if isinstance(resize, int) else resize[0]
        too_big = max(crop_hw) > side
    else:
        too_big = crop_hw[0] > resize[0] or crop_hw[1] > resize[1]
    if too_big:
        raise CheckpointError(f"crop {plain_size(crop)} is larger than resize {plain_size(resize)}: "
                              "CenterCrop would pad the images with black; set crop <= resize "
                              "(or crop 0: no crop)")


def plain_size(size: Size | None) -> int | list[int] | None:
    """A size as JSON and torchvision's transforms take it: an int, or a list."""
    return list(size) if isinstance(size, tuple) else size


def file_sha256(path: str | Path) -> str:
    """Hash of a weights file, recorded in run provenance so that a resumed run uses the same model."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
