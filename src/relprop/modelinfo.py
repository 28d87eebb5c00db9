"""What a loaded classifier is and how its inputs are made: `ModelInfo`, in the spirit of timm's
`PretrainedCfg`.

`relprop.models.load_model` returns `(model, ModelInfo)`. Everything that needs to know the
model's classes, its preprocessing or where its weights came from reads these attributes; no
package passes the model's metadata as a dict. The one dict form is `ModelInfo.to_dict()`: the
keys of a relprop checkpoint (../shared/README.md) plus where the weights came from. It is what a
`--model-def FILE.py:FUNCTION` builder receives, so such files need no relprop import.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from relprop.defaults import IMAGENET_MEAN, IMAGENET_STD

PREPROCESSING_KEYS = ("resize", "crop", "mean", "std")

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
        object.__setattr__(self, "resize", _size(self.resize))
        object.__setattr__(self, "crop", None if self.crop is None else _size(self.crop))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

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
        return cls(data["resize"], data.get("crop"), data.get("mean", cls.mean),
                   data.get("std", cls.std), data.get("interpolation") or "bilinear")


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
        if self.input_size is None:
            object.__setattr__(self, "input_size", self.preprocessing.input_size)

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
        """The inverse of `to_dict` (keys it does not know are kept in `extra`)."""
        known = {"arch", "num_classes", "classes", "class_names", "input_size", "path", "weights",
                 "url", "assumed", *PREPROCESSING_KEYS, "interpolation"}
        count = int(data["num_classes"])
        path = data.get("path")
        return cls(
            arch=str(data["arch"]), num_classes=count,
            classes=[str(c) for c in data.get("classes") or range(count)],
            preprocessing=Preprocessing.from_dict(data),
            class_names=None if data.get("class_names") is None else list(data["class_names"]),
            input_size=data.get("input_size"),
            source=None if path is None else WeightsSource(str(path), data.get("weights"), data.get("url")),
            assumed=tuple(data.get("assumed") or ()),
            extra={k: v for k, v in data.items() if k not in known},
        )


def as_preprocessing(spec: Preprocessing | ModelInfo) -> Preprocessing:
    """The preprocessing of a model, or the preprocessing itself."""
    return spec.preprocessing if isinstance(spec, ModelInfo) else spec


def _size(size: Any) -> Size:
    if isinstance(size, int | float):
        return int(size)
    return tuple(int(s) for s in size)


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
