"""Load a classifier and its preprocessing from a weights file or a torchvision weights name.

Three sources: relprop checkpoints (a dict with `arch`, `num_classes`, `classes`, `input_size`,
`resize`, `crop`, `mean`, `std` and `state_dict`: docs/checkpoints.md, written by
`relprop.save_checkpoint`); plain state dicts,
whose architecture and preprocessing come from the caller (the CLI's `--arch`, `--num-classes`,
`--resize`, `--crop`, `--mean`, `--std`); and torchvision weights names
(`ResNet50_Weights.IMAGENET1K_V2`, or `--arch resnet101` with `DEFAULT`), resolved through
torchvision's own weights API: the file sits in the torch hub cache (`TORCH_HOME`) and is
downloaded there on first use, with torchvision's progress bar, unless `offline`. Files are read
with `weights_only=True` only: a weights file must never run code. Every failure is one
`CheckpointError` line naming the file. Hugging Face image classifiers come as `hf/<folder or hub
id>` (`--arch` or `--weights`), loaded with their image processor's preprocessing (relprop.huggingface).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.hub import HASH_REGEX, download_url_to_file
from torchvision import transforms
from torchvision.models import get_model_weights, get_weight
from torchvision.models.detection import SSD300_VGG16_Weights

from relprop.bow.storage import is_bow_file, load_bow_model
from relprop.defaults import DEFAULT_WEIGHTS, IMAGENET_MEAN, IMAGENET_STD
from relprop.detection.architectures import ARCHITECTURES
from relprop.detection.builders import build_detector
from relprop.detection.families import family_of
from relprop.errors import CheckpointError, RelpropError, first_line
from relprop.huggingface import is_hf, load_hf_model
from relprop.modelinfo import (
    CHECKPOINT_KEYS,
    PREPROCESSING_KEYS,
    ModelInfo,
    Preprocessing,
    WeightsSource,
    as_preprocessing,
    class_count,
    plain_size,
)

_STORED_KEYS = tuple(k for k in CHECKPOINT_KEYS if k != "state_dict")
__all__ = ["PREPROCESSING_KEYS", "ModelInfo", "Preprocessing", "WeightsSource", "load_model",
           "load_detector", "preprocessing", "describe_preprocessing", "class_names_of"]


def load_model(
    weights: str | Path | None = None,
    arch: str | None = None,
    num_classes: int | None = None,
    model_def: str | None = None,
    *,
    resize: int | Sequence[int] | None = None,
    crop: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    classes: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    offline: bool = False,
) -> tuple[nn.Module, ModelInfo]:
    """Build the model `weights` describes, load the weights, return `(eval fp32 model, info)`.

    `weights` is a file or a torchvision weights name (`None`: `DEFAULT_WEIGHTS`, or the `DEFAULT`
    weights of `arch`). Arguments other than `weights` override what a checkpoint says (and are
    required for a plain state dict, except `num_classes`, which is read from the last layer).
    `info.assumed` names the preprocessing settings that nothing gave (plain state dicts).
    """
    hf = arch if is_hf(arch) else str(weights) if is_hf(str(weights)) else None
    if hf is not None:  # a Hugging Face model: weights and preprocessing from its folder or hub id
        if weights not in (None, "DEFAULT", hf):
            raise CheckpointError(f"--arch {hf} loads its weights from there; drop --weights {weights}")
        model, info = load_hf_model(hf, offline=offline)
        given = {k: v for k, v in (("resize", resize), ("crop", crop), ("mean", mean), ("std", std))
                 if v is not None}
        return model, replace(info, preprocessing=replace(info.preprocessing, **given)) if given else info
    path, stored, named = _source(weights, arch, offline)
    if is_bow_file(path):  # a BoW kernel classifier from `relprop fit-bow` (relprop.bow)
        model, fields = load_bow_model(path)
        return model, ModelInfo.from_dict({**fields, "path": str(path), "assumed": []})
    content = _read(path)
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        state_dict = content["state_dict"]
        stored = {**{k: _plain(content.get(k)) for k in _STORED_KEYS}, **stored}
        _check_state_dict(path, state_dict)
    elif isinstance(content, Mapping) and content and all(
        isinstance(v, torch.Tensor) for v in content.values()
    ):
        state_dict = content
    else:
        raise CheckpointError(
            f"{path}: not a checkpoint (expected a dict with 'state_dict' or a state dict of tensors)"
        )
    state_dict = _as_fp32(_strip_prefix(state_dict))
    given = {"arch": arch, "num_classes": num_classes, "resize": resize, "crop": crop,
             "mean": mean, "std": std, "classes": list(classes) if classes else None,
             "class_names": list(class_names) if class_names else None}
    source = WeightsSource(str(path), named.name if named else None, named.url if named else None)
    info = _info(path, stored, given, state_dict, model_def, source)
    if isinstance(content, Mapping) and content.get("model_kwargs") is not None:
        info = replace(info, extra={**info.extra, "model_kwargs": _model_kwargs(path, content["model_kwargs"])})
    model = _build(path, info, model_def)
    _load_state(path, model, state_dict, info.arch)
    return model.float().eval(), info


def describe_preprocessing(spec: Preprocessing | ModelInfo) -> str:
    """`Resize 256 -> CenterCrop 224, mean (...), std (...)`: what `preprocessing(spec)` does."""
    p = as_preprocessing(spec)
    text = f"Resize {plain_size(p.resize)}"
    if p.crop:
        text += f" -> CenterCrop {plain_size(p.crop)}"
    if p.interpolation != "bilinear":
        text += f" ({p.interpolation})"
    mean = tuple(round(v, 4) for v in p.mean)
    std = tuple(round(v, 4) for v in p.std)
    if mean == IMAGENET_MEAN and std == IMAGENET_STD:
        return text + ", ImageNet mean/std"
    return text + f", mean {mean}, std {std}"


def preprocessing(spec: Preprocessing | ModelInfo) -> transforms.Compose:
    """`Resize(resize)` -> `CenterCrop(crop)` if any -> `ToTensor` -> `Normalize(mean, std)`."""
    p = as_preprocessing(spec)
    interpolation = transforms.InterpolationMode(p.interpolation)
    steps: list[Any] = [transforms.Resize(plain_size(p.resize), interpolation=interpolation)]
    if p.crop:
        steps.append(transforms.CenterCrop(plain_size(p.crop)))
    steps += [transforms.ToTensor(), transforms.Normalize(list(p.mean), list(p.std))]
    return transforms.Compose(steps)


def _read(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and unsafe-global errors all mean "not loadable"
        raise CheckpointError(f"{path}: {_why_unloadable(path, error)}") from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _why_unloadable(path: Path, error: Exception) -> str:
    """relprop's own words for torch.load's long, ANSI-coloured failure texts."""
    text = _ANSI.sub("", str(error))
    refusal = ("relprop refuses it on purpose (weights are read with torch.load(weights_only=True)); "
               "where you trust the file, re-save its weights with "
               "torch.save(model.state_dict(), 'weights.pt')")
    code = re.search(r"GLOBAL ([\w.]+)", text)
    if code:
        return (f"loading this file needs pickle code execution (it stores the Python object "
                f"{code.group(1)}, not only tensors); {refusal}")
    with open(path, "rb") as handle:
        head = handle.read(2)
    if "Weights only load failed" in text and head[:1] == b"\x80":
        return f"a pickle that only unrestricted unpickling (code execution) could read; {refusal}"
    if "PytorchStreamReader" in text or head == b"PK":
        return "a corrupt or truncated PyTorch file (its zip archive cannot be read)"
    return "not a PyTorch weights file (torch.save writes a zip archive; this is something else)"


def _plain(value: Any) -> Any:
    """A tensor stored as metadata (a mean as torch.tensor([...])) as the list it stands for."""
    return value.tolist() if isinstance(value, torch.Tensor) else value


def _check_state_dict(path: Path, state_dict: Mapping[Any, Any]) -> None:
    """A checkpoint's `state_dict` must map names to tensors (anything else fails later, deep
    inside torch, with a traceback)."""
    if not state_dict:
        raise CheckpointError(f"{path}: its state_dict is empty")
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: state_dict key {key!r} is not a parameter name")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict entry {key!r} is a {type(value).__name__}, "
                                  "not a tensor")


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the `module.` prefix that DataParallel / DistributedDataParallel checkpoints carry."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _as_fp32(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Half-precision checkpoints are cast to fp32: relevance needs the full-precision forward."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def classes_from_state(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """Number of outputs of the last 2-D weight (e.g. `fc.weight`), for plain state dicts."""
    matrices = [v for v in state_dict.values() if v.ndim == 2]
    return int(matrices[-1].shape[0]) if matrices else None


def _info(path: Path, stored: dict[str, Any], given: dict[str, Any],
          state_dict: Mapping[str, torch.Tensor], model_def: str | None,
          source: WeightsSource) -> ModelInfo:
    """What the file stores (a checkpoint's keys, a torchvision weights' metadata), overridden by
    what the caller gives, completed by relprop's defaults (named in `assumed`)."""
    found = {k: v for k, v in stored.items() if v is not None}
    if given["classes"] is not None:  # the stored names belong to the stored ids
        found.pop("class_names", None)
    found.update({k: v for k, v in given.items() if v is not None})
    assumed = tuple(k for k in PREPROCESSING_KEYS if k not in found
                    and not (k in ("resize", "crop") and "input_size" in found))
    if "arch" not in found and model_def is None:
        raise CheckpointError(f"{path}: a plain state dict needs --arch (e.g. resnet50) or --model-def")
    count = found.get("num_classes")
    if count is None:
        count = classes_from_state(state_dict)
        if count is None:
            raise CheckpointError(f"{path}: cannot tell the number of classes; pass --num-classes")
    if "resize" in found:
        resize, crop = found["resize"], found.get("crop")
    else:
        resize = found.get("input_size") or 256
        crop = found.get("crop", 224 if "input_size" not in found else None)
    try:  # ModelInfo and Preprocessing check every value; the line gets the file's name
        count = class_count(count)
        return ModelInfo(
            arch=found.get("arch", model_def), num_classes=count,
            classes=found.get("classes", [str(i) for i in range(count)]),
            preprocessing=Preprocessing(resize, crop, found.get("mean", IMAGENET_MEAN),
                                        found.get("std", IMAGENET_STD),
                                        found.get("interpolation") or "bilinear"),
            class_names=found.get("class_names"), input_size=found.get("input_size"),
            source=source, assumed=assumed,
        )
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None


def _model_kwargs(path: Path, value: Any) -> dict[str, Any]:
    """A checkpoint's `model_kwargs` (architecture keywords a timm model was built with, e.g. a
    ViT's img_size and patch_size: benchmarks/train_tin10.py --model-kwargs)."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise CheckpointError(f"{path}: model_kwargs must be a dict of keyword arguments, got {type(value).__name__}")
    return dict(value)


def _build(path: Path, info: ModelInfo, model_def: str | None) -> nn.Module:
    if model_def is not None:
        return _from_model_def(model_def, info)
    return build_arch(info.arch, info.num_classes, source=str(path), **info.extra.get("model_kwargs", {}))


TIMM_PREFIX = "timm/"


def build_arch(arch: str, num_classes: int, source: str = "--arch", **kwargs: Any) -> nn.Module:
    """A randomly initialised classifier named `arch`: torchvision's, else timm's.

    `timm/NAME` always means timm's NAME (`timm/efficientnet_b0`: both libraries have an
    `efficientnet_b0`, and they differ); a bare name torchvision does not know is looked up in timm.
    Pretrained timm weights are never fetched (`pretrained=False`): the weights come from the file.
    `kwargs` (a checkpoint's `model_kwargs`) go to the builder: a ViT's img_size, patch_size, depth.
    """
    if not arch.startswith(TIMM_PREFIX) and arch in classifiers():
        try:
            return torchvision.models.get_model(arch, num_classes=num_classes, **kwargs)
        except TypeError as error:
            raise CheckpointError(f"{source}: cannot build {arch!r} with {kwargs} ({error})") from None
    name = arch.removeprefix(TIMM_PREFIX)
    try:
        import timm  # deferred: optional and slow to import; only timm: architectures need it
    except ImportError:
        raise CheckpointError(f"{source}: architecture {arch!r} is neither torchvision's nor "
                              "buildable without timm (pip install timm)") from None
    if not timm.is_model(name):
        raise CheckpointError(f"{source}: unknown architecture {arch!r} (neither a torchvision "
                              "classifier nor a timm model; e.g. resnet50, convnext_atto)")
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{source}: cannot build timm architecture {name!r} ({error})") from None


def _from_model_def(model_def: str, info: ModelInfo) -> nn.Module:
    """`FILE.py:FUNCTION` -> FUNCTION(metadata), for models torchvision does not know.

    FUNCTION gets `info.to_dict()`: a plain dict with the checkpoint's keys (`num_classes`,
    `input_size`, `classes`, `resize`, ...), so that the file needs no relprop import.
    """
    file, sep, function = model_def.rpartition(":")
    if not sep or not file or not function:
        raise CheckpointError(f"--model-def {model_def!r}: expected FILE.py:FUNCTION")
    source = Path(file)
    if not source.is_file():
        raise CheckpointError(f"--model-def {model_def!r}: no such file {source}")
    if source.resolve() == Path(__file__).resolve():  # relprop's own builders (torchvision SSDs)
        module: Any = sys.modules[__name__]
    else:
        spec = importlib.util.spec_from_file_location(f"relprop_model_def_{source.stem}", source)
        if spec is None or spec.loader is None:
            raise CheckpointError(f"--model-def {model_def!r}: {source} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as error:  # the user's code: any error, named by file and line
            raise CheckpointError(f"--model-def {model_def!r}: importing it failed: "
                                  f"{_where(error, source)}") from None
    builder = getattr(module, function, None)
    if not callable(builder):
        raise CheckpointError(f"--model-def {model_def!r}: {source} has no function {function!r}")
    try:
        model = builder(info.to_dict())
    except RelpropError:
        raise
    except (Exception, SystemExit) as error:  # the user's code: any error, named by file and line
        raise CheckpointError(f"--model-def {model_def!r}: {function}(metadata) failed: "
                              f"{_where(error, source)}") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"--model-def {model_def!r}: {function}(metadata) did not return an "
                              "nn.Module")
    return model


def _where(error: BaseException, source: Path) -> str:
    """`FILE line N: Type: message` for an error raised by a --model-def file: the line of that
    file nearest the error (a syntax error's own line; else the last traceback frame in the file)."""
    reason = f"{type(error).__name__}: {first_line(error, default='')}".rstrip(": ")
    if isinstance(error, SyntaxError) and error.lineno is not None:
        return f"{error.filename or source} line {error.lineno}: {type(error).__name__}: {error.msg}"
    target = source.resolve()
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if frame.filename and Path(frame.filename).resolve() == target]
    if frames:
        return f"{source} line {frames[-1].lineno}: {reason}"
    return f"{source}: {reason}"


def state_mismatches(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]
                     ) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys and `key (given shape) vs model (expected shape)`: the one
    comparison that loading and saving a checkpoint both refuse on."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [f"{k} {tuple(given[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in given and given[k].shape != v.shape]
    return missing, unexpected, mismatched


def _load_state(path: Path, model: nn.Module, state_dict: Mapping[str, torch.Tensor], arch: str) -> None:
    """Strict load, with the first mismatches named on one line instead of PyTorch's long report."""
    missing, unexpected, mismatched = state_mismatches(model.state_dict(), state_dict)
    problems = [
        f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", mismatched))
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"{path}: weights do not fit {arch}: " + "; ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True)


# --- torchvision weights names ------------------------------------------------------------------


@dataclass(frozen=True)
class TorchvisionWeights:
    """A torchvision weights enum member and the classification architecture it belongs to."""

    arch: str
    weights: Any  # torchvision.models.WeightsEnum

    @property
    def name(self) -> str:
        return f"{type(self.weights).__name__}.{self.weights.name}"

    @property
    def url(self) -> str:
        return str(self.weights.url)

    @property
    def cache_path(self) -> Path:
        """Where torchvision's `load_state_dict_from_url` keeps the file: `$TORCH_HOME/hub/checkpoints/`."""
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(self.url.split("?")[0])

    def stored(self) -> dict[str, Any]:
        """Architecture, classes and preprocessing (a checkpoint's keys), all from the weights' own
        `meta` and `transforms()`."""
        categories = list(self.weights.meta["categories"])
        imagenet = "IMAGENET1K" in self.weights.name and len(categories) == 1000
        transform = self.weights.transforms()
        interpolation = getattr(transform, "interpolation", transforms.InterpolationMode.BILINEAR)
        return {
            "arch": self.arch, "num_classes": len(categories),
            "classes": imagenet_wnids() if imagenet else categories, "class_names": categories,
            "resize": _single(transform.resize_size), "crop": _single(transform.crop_size),
            "mean": list(transform.mean), "std": list(transform.std),
            "interpolation": interpolation.value,
        }


def torchvision_weights(text: str, arch: str | None = None) -> TorchvisionWeights | None:
    """`ResNet50_Weights.IMAGENET1K_V2`, or `IMAGENET1K_V2` / `DEFAULT` with `arch`; None if neither.

    A name that belongs to another architecture than `arch`, or to a non-classification model, is
    a `CheckpointError`.
    """
    if "." in text:
        if not re.fullmatch(r"[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+", text):
            return None
        try:
            weights = get_weight(text)
        except (ValueError, KeyError, AttributeError):
            raise CheckpointError(f"--weights {text}: torchvision has no such weights "
                                  "(e.g. ResNet50_Weights.IMAGENET1K_V2)") from None
        owner = _classifier_of(type(weights))
        if owner is None:
            raise CheckpointError(f"--weights {text}: not the weights of a torchvision classifier")
        if arch is not None and arch != owner:
            raise CheckpointError(f"--weights {text} are {owner}'s weights, not --arch {arch}'s")
        return TorchvisionWeights(owner, weights)
    if arch is None or not re.fullmatch(r"[A-Z0-9_]+", text) or arch not in classifiers():
        return None
    enum = get_model_weights(arch)
    if text not in enum.__members__:
        raise CheckpointError(f"--weights {text}: {arch} has the weights "
                              f"{', '.join(enum.__members__)} (or give a weights file)")
    return TorchvisionWeights(arch, enum[text])


def fetch(weights: TorchvisionWeights, offline: bool = False) -> Path:
    """The weights file in the torch hub cache; downloaded there first unless `offline`.

    The download is torchvision's own (`torch.hub.download_url_to_file`, with its progress bar on
    stderr) and checks the hash prefix in the file name; a file found in the cache is used as it
    is, as torchvision does (`check_hash=False`).
    """
    path = weights.cache_path
    if path.is_file():
        return path
    if offline:
        raise CheckpointError(f"{weights.name}: not in the torch hub cache and --offline forbids "
                              f"downloading it; download {weights.url} to {path}")
    match = HASH_REGEX.search(path.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"relprop: downloading {weights.name} (once) from {weights.url} to {path}",
              file=sys.stderr, flush=True)
        download_url_to_file(weights.url, str(path), match.group(1) if match else None,
                             progress=True)
    except (OSError, RuntimeError) as error:
        reason = " ".join(_ANSI.sub("", str(error)).split())[:120] or type(error).__name__
        raise CheckpointError(f"{weights.name}: cannot download {weights.url} ({reason}); "
                              f"without a network, put that file at {path}") from None
    return path


@cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """(wnid, WordNet lemmas) of the 1,000 ImageNet-1k classes in torchvision's index order.

    Shipped as `relprop/resources/imagenet_classes.tsv` (made by tools/make_imagenet_classes.py).
    """
    text = files("relprop").joinpath("resources", "imagenet_classes.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return tuple((wnid, lemmas) for wnid, lemmas in rows)


def imagenet_wnids() -> list[str]:
    return [wnid for wnid, _ in imagenet_classes()]


def _source(weights: str | Path | None, arch: str | None,
            offline: bool) -> tuple[Path, dict[str, Any], TorchvisionWeights | None]:
    """The file to read, the metadata a torchvision weights name brings with it, and that name."""
    if weights is None:
        weights = "DEFAULT" if arch is not None else DEFAULT_WEIGHTS
    text = str(weights)
    if Path(text).is_file():
        return Path(text), {}, None
    if Path(text).exists():  # a FIFO or a device would block or never end; a folder is no weights
        raise CheckpointError(f"{text}: not a regular file, so not a weights file")
    named = torchvision_weights(text, arch)
    if named is None:
        if arch is None and re.fullmatch(r"[A-Z0-9_]+", text):
            raise CheckpointError(f"--weights {text}: name the architecture too (--arch resnet50 "
                                  f"--weights {text}) or give the full name, e.g. ResNet50_Weights.{text}")
        if weights == "DEFAULT":
            raise CheckpointError(f"--arch {arch}: not a torchvision classifier with weights; "
                                  "give --weights FILE")
        raise CheckpointError(f"{text}: no such weights file (nor a torchvision weights name "
                              "such as ResNet50_Weights.IMAGENET1K_V2)")
    return fetch(named, offline), named.stored(), named


@cache
def classifiers() -> tuple[str, ...]:
    """Every torchvision classification builder's name."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


def _classifier_of(enum: type) -> str | None:
    """The torchvision classification model whose weights enum is `enum`."""
    return next((name for name in classifiers() if get_model_weights(name) is enum), None)


def _single(size: Sequence[int]) -> int | list[int]:
    return int(size[0]) if len(size) == 1 else [int(s) for s in size]


# ---------------------------------------------------------------- detectors and class names


def load_detector(weights: str | Path | None, model_def: str | None = None, arch: str | None = None,
                  num_classes: int | None = None, *, classes: Sequence[str] | None = None,
                  class_names: Sequence[str] | None = None,
                  offline: bool = True) -> tuple[nn.Module, ModelInfo]:
    """A detector CRP reads (SSD, RetinaNet, FCOS) and its `ModelInfo`. `weights` is a file, or
    torchvision's weights of a detector of `relprop.detection.architectures` (`DEFAULT`/`COCO_V1`
    with `arch`, or `FCOS_ResNet50_FPN_Weights.COCO_V1`), read from the torch hub cache. A named
    architecture is built without downloading anything, its BatchNorm frozen where the file's is."""
    if weights is None:
        raise RelpropError("a detector needs --weights FILE")
    named = None if Path(str(weights)).exists() else detector_weights(str(weights), arch)
    if named is not None:
        categories = list(named.weights.meta["categories"])
        if num_classes not in (None, len(categories)):
            raise CheckpointError(f"--num-classes {num_classes}: {named.name} has {len(categories)} classes "
                                  "(background included); drop --num-classes or give your own checkpoint")
        weights, arch, num_classes = fetch(named, offline), named.arch, len(categories)
        class_names = class_names or categories
    if model_def is None:
        stored, frozen = _stored_detector(weights, arch)
        if arch is not None or stored is not None:
            model_def = f"{Path(__file__).resolve()}:torchvision_detector{'_frozen' if frozen else ''}"
    model, info = load_model(weights, arch=arch, num_classes=num_classes, model_def=model_def,
                             classes=classes, class_names=class_names, offline=offline)
    try:
        family_of(model)
    except RelpropError as error:
        raise RelpropError(f"{weights}: {error}") from None
    return model.eval(), info


def detector_weights(text: str, arch: str | None = None) -> TorchvisionWeights | None:
    """torchvision's weights of a detector: `RetinaNet_ResNet50_FPN_Weights.COCO_V1`, or `COCO_V1` /
    `DEFAULT` with `arch`; None if `text` names no weights (then it is a file name)."""
    if "." in text and re.fullmatch(r"[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+", text):
        try:
            weights = get_weight(text)
        except (ValueError, KeyError, AttributeError):
            raise CheckpointError(f"--weights {text}: torchvision has no such weights "
                                  "(e.g. FCOS_ResNet50_FPN_Weights.COCO_V1)") from None
        owner = next((name for name in _pretrained_detectors() if get_model_weights(name) is type(weights)), None)
        if owner is None:
            raise CheckpointError(f"--weights {text}: not the weights of a detector relprop explains "
                                  f"({', '.join(_pretrained_detectors())})")
        if arch is not None and arch != owner:
            raise CheckpointError(f"--weights {text} are {owner}'s weights, not --arch {arch}'s")
        return TorchvisionWeights(owner, weights)
    if arch is None or not re.fullmatch(r"[A-Z0-9_]+", text):
        return None
    if arch not in _pretrained_detectors():
        raise CheckpointError(f"--arch {arch}: torchvision has no pretrained weights for it; give a "
                              "checkpoint file (--weights FILE)")
    enum = get_model_weights(arch)
    if text not in enum.__members__:
        raise CheckpointError(f"--weights {text}: {arch} has the weights {', '.join(enum.__members__)} "
                              "(or give a weights file)")
    return TorchvisionWeights(arch, enum[text])


def _pretrained_detectors() -> tuple[str, ...]:
    return tuple(name for name, a in ARCHITECTURES.items() if a.torchvision)


def _stored_detector(weights: str | Path, arch: str | None) -> tuple[str | None, bool]:
    """The detector architecture a file names (None: none of relprop's), and whether its BatchNorm
    is frozen (running statistics without `num_batches_tracked`, as torchvision's pretrained files)."""
    if not Path(weights).is_file():  # a FIFO would block open(); load_model names what it is
        return None, False
    try:
        content = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # load_model reports unreadable files on one line
        return None, False
    if not isinstance(content, Mapping):
        return None, False
    stored = content.get("arch") if isinstance(content.get("arch"), str) else None
    if arch is not None and stored is not None and stored != arch:
        raise CheckpointError(f"{weights}: a {stored} checkpoint, not --arch {arch} (drop --arch: the "
                              "checkpoint names its architecture)")
    state = content.get("state_dict", content)
    keys = [k for k in state if isinstance(k, str)] if isinstance(state, Mapping) else []
    frozen = any(k.endswith("running_var") for k in keys) and not any(k.endswith("num_batches_tracked") for k in keys)
    return (stored if stored in ARCHITECTURES else None), frozen


def torchvision_detector(metadata: Mapping[str, Any], frozen: bool = False) -> nn.Module:
    """`--model-def` builder of the detectors of `relprop.detection.architectures`, with no weight
    downloads (it gets `ModelInfo.to_dict()`, as every --model-def builder does)."""
    info = ModelInfo.from_dict(metadata)
    if info.arch not in ARCHITECTURES:
        raise RelpropError(f"--arch {info.arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    stored = "resize" not in info.assumed  # else input_size is relprop's classifier default, not the file's
    return build_detector(info.arch, info.num_classes, _input_side(info.input_size) if stored else None,
                          frozen=frozen)


def torchvision_detector_frozen(metadata: Mapping[str, Any]) -> nn.Module:
    """`torchvision_detector` with FrozenBatchNorm2d (torchvision's pretrained detectors' files)."""
    return torchvision_detector(metadata, frozen=True)


def _input_side(size: Any) -> int | None:
    return None if not size else int(size[0] if isinstance(size, (list, tuple)) else size)


def class_names_of(info: ModelInfo, count: int | None = None, *,
                   detector: bool = False) -> list[str]:
    """Readable names of a model's `count` classes (default: its `num_classes`), the one
    resolver: its `class_names`, else its `classes` (unless they are only the indices), else
    COCO's for a 91-class torchvision SSD, else numbers (`background`, `class 1`, ... for a
    detector, whose class 0 is the background)."""
    count = info.num_classes if count is None else count
    for names in (info.class_names, info.classes):
        if names and len(names) == count and not all(str(n) == str(i) for i, n in enumerate(names)):
            return [str(name) for name in names]
    if detector and info.arch in ARCHITECTURES and count == 91:
        return list(SSD300_VGG16_Weights.COCO_V1.meta["categories"])
    if detector:
        return ["background"] + [f"class {k}" for k in range(1, count)]
    return [str(i) for i in range(count)]
