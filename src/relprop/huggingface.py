"""Hugging Face `transformers` image classifiers (the optional `hf` extra): `hf/<folder or hub
id>` loads the model with `AutoModelForImageClassification.from_pretrained` (safetensors only:
a weights file must never run code) and its preprocessing from `AutoImageProcessor`, translated
into relprop's `Preprocessing` (resize, crop, mean, std, interpolation).

Offline (`offline=True`, or `HF_HUB_OFFLINE=1` in the environment), only a local folder or the
Hugging Face cache is read. The model itself goes to `relprop.LRP` as it is: LRP takes the
`logits` of its `ImageClassifierOutput`, and models torch.fx cannot trace symbolically (all of
these) take the capture path (`core/capture.py`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from relprop.errors import CheckpointError, first_line
from relprop.modelinfo import ModelInfo, Preprocessing, WeightsSource

HF_PREFIX = "hf/"
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json")


def is_hf(spec: Any) -> bool:
    """Does an --arch or --weights value name a Hugging Face model (`hf/...`)?"""
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


def load_hf_model(spec: str, *, offline: bool = False) -> tuple[nn.Module, ModelInfo]:
    """`hf/<folder or hub id>` -> (eval fp32 model, its ModelInfo, preprocessing from its image
    processor). Every failure is one CheckpointError line naming the model."""
    try:
        import transformers  # deferred: the optional `hf` extra, slow to import
    except ImportError:
        raise CheckpointError(f"{spec}: Hugging Face models need transformers "
                              "(pip install 'relprop[hf]')") from None
    name = spec.removeprefix(HF_PREFIX)
    offline = offline or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a bar per load of a local file is noise
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(
            name, use_safetensors=True, local_files_only=offline)
        processor = transformers.AutoImageProcessor.from_pretrained(name, local_files_only=offline)
    except Exception as error:  # hub, file and config errors all mean "cannot load this model"
        where = " (offline: only a local folder or the Hugging Face cache)" if offline else ""
        raise CheckpointError(f"{spec}: cannot load a Hugging Face image classifier{where}: "
                              f"{first_line(error)}") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    config = model.config
    count = int(config.num_labels)
    names = [str(config.id2label.get(i, i)) for i in range(count)]
    named = any(label != f"LABEL_{i}" for i, label in enumerate(names))
    info = ModelInfo(
        arch=spec, num_classes=count, classes=[str(i) for i in range(count)],
        preprocessing=processor_preprocessing(processor, spec),
        class_names=names if named else None,
        source=WeightsSource(str(_weights_file(name)), name=spec),
    )
    return logits_only(model).float().eval(), info


def logits_only(model: nn.Module) -> nn.Module:
    """The model, its class swapped for a subclass whose forward returns the logits tensor, as
    every relprop method, metric and pipeline expects of a classifier (module names, types and
    weights unchanged; `LRP` alone would also take the `ImageClassifierOutput` as it is)."""
    base = type(model)

    class LogitsOnly(base):  # type: ignore[misc, valid-type]
        def forward(self, pixel_values):  # noqa: ANN001, ANN202 - the signature of the base's first argument
            return base.forward(self, pixel_values=pixel_values, return_dict=True).logits

    LogitsOnly.__name__, LogitsOnly.__qualname__ = base.__name__, base.__qualname__
    model.__class__ = LogitsOnly
    return model


def processor_preprocessing(processor: Any, spec: str = "model") -> Preprocessing:
    """The image processor's resize, crop and normalization as relprop's `Preprocessing`."""
    factor = getattr(processor, "rescale_factor", 1 / 255)
    if getattr(processor, "do_rescale", True) and abs(factor - 1 / 255) > 1e-9:
        raise CheckpointError(f"{spec}: its image processor rescales by {processor.rescale_factor}, "
                              "relprop's preprocessing by 1/255 only")
    size = _size_dict(processor.size)
    crop = _size_dict(processor.crop_size) if getattr(processor, "do_center_crop", False) else {}
    crop_size: Any = (crop["height"], crop["width"]) if crop.get("height") else None
    if size.get("shortest_edge"):
        edge = int(size["shortest_edge"])
        crop_pct = getattr(processor, "crop_pct", None)
        if crop_pct and edge < 384:  # ConvNeXt's processor: resize edge / crop_pct, crop edge
            resize: Any = int(edge / crop_pct)
            crop_size = (edge, edge)
        else:
            resize = (edge, edge) if crop_pct else edge
    elif size.get("height"):
        resize = (int(size["height"]), int(size["width"]))
    else:
        raise CheckpointError(f"{spec}: its image processor's size {size} is neither a height and width "
                              "nor a shortest edge")
    normalize = getattr(processor, "do_normalize", True)
    mean = tuple(processor.image_mean) if normalize else (0.0, 0.0, 0.0)
    std = tuple(processor.image_std) if normalize else (1.0, 1.0, 1.0)
    return Preprocessing(resize, crop_size, mean, std, _interpolation(getattr(processor, "resample", 2)))


def _size_dict(size: Any) -> dict[str, Any]:
    if size is None:
        return {}
    if isinstance(size, int):
        return {"height": size, "width": size}
    items = size.items() if hasattr(size, "items") else vars(size).items()
    return {k: v for k, v in items if v is not None}


def _interpolation(resample: Any) -> str:
    from PIL import Image  # deferred: only for a processor's resampling filter's name

    try:
        return Image.Resampling(int(resample)).name.lower()
    except (ValueError, TypeError):
        return "bilinear"


def _weights_file(name: str) -> Path:
    """The file results are keyed by (its hash): the folder's safetensors (or their index)."""
    folder = Path(name)
    if folder.is_dir():
        for file in WEIGHTS_FILES:
            if (folder / file).is_file():
                return folder / file
        return folder / "config.json"
    from transformers.utils import cached_file  # deferred: the optional `hf` extra

    for file in WEIGHTS_FILES:
        path = cached_file(name, file, local_files_only=True, _raise_exceptions_for_missing_entries=False)
        if path:
            return Path(path)
    return Path(cached_file(name, "config.json", local_files_only=True))
