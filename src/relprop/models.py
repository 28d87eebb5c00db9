"""Load a classifier and its preprocessing from a weights file, without any download.

Two kinds of files: relprop checkpoints (a dict with `arch`, `num_classes`, `classes`, `input_size`,
`resize`, `crop`, `mean`, `std` and `state_dict`, as in ../shared/README.md) and plain state dicts,
whose architecture and preprocessing come from the caller (the CLI's `--arch`, `--num-classes`,
`--resize`, `--crop`, `--mean`, `--std`). Files are read with `weights_only=True` only: a weights
file must never run code. Every failure is one `CheckpointError` line naming the file.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision import transforms

from relprop.errors import CheckpointError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_META_KEYS = ("arch", "num_classes", "classes", "class_names", "input_size", "resize", "crop",
              "mean", "std")


def load_model(
    weights: str | Path,
    arch: str | None = None,
    num_classes: int | None = None,
    model_def: str | None = None,
    *,
    resize: int | Sequence[int] | None = None,
    crop: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a weights file describes, load the weights, return `(eval fp32 model, meta)`.

    Arguments other than `weights` override what a checkpoint says (and are required for a plain
    state dict, except `num_classes`, which is read from the last layer when absent).
    """
    path = Path(weights)
    from relprop.bow.storage import is_bow_file, load_bow_model

    if is_bow_file(path):  # a BoW kernel classifier from `relprop fit-bow` (relprop.bow)
        return load_bow_model(path)
    content = _read(path)
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        state_dict, stored = content["state_dict"], {k: content.get(k) for k in _META_KEYS}
    elif isinstance(content, Mapping) and content and all(
        isinstance(v, torch.Tensor) for v in content.values()
    ):
        state_dict, stored = content, {}
    else:
        raise CheckpointError(
            f"{path}: not a checkpoint (expected a dict with 'state_dict' or a state dict of tensors)"
        )
    state_dict = _as_fp32(_strip_prefix(state_dict))
    given = {"arch": arch, "num_classes": num_classes, "resize": resize, "crop": crop,
             "mean": mean, "std": std}
    meta = _meta(path, stored, given, state_dict, model_def)
    model = _build(path, meta, model_def)
    _load_state(path, model, state_dict, str(meta["arch"]))
    return model.float().eval(), meta


def preprocessing(meta: Mapping[str, Any]) -> transforms.Compose:
    """`Resize(resize)` -> `CenterCrop(crop)` if any -> `ToTensor` -> `Normalize(mean, std)`."""
    steps: list[Any] = [transforms.Resize(_size_arg(meta["resize"]))]
    if meta.get("crop"):
        steps.append(transforms.CenterCrop(_size_arg(meta["crop"])))
    steps += [transforms.ToTensor(), transforms.Normalize(list(meta["mean"]), list(meta["std"]))]
    return transforms.Compose(steps)


def file_sha256(path: str | Path) -> str:
    """Hash of a weights file, recorded in run provenance so that a resumed run uses the same model."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _size_arg(size: int | Sequence[int]) -> int | list[int]:
    return int(size) if isinstance(size, int | float) else [int(s) for s in size]


def _read(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and unsafe-global errors all mean "not loadable"
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise CheckpointError(f"{path}: not a loadable PyTorch weights file ({reason})") from None


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the `module.` prefix that DataParallel / DistributedDataParallel checkpoints carry."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _as_fp32(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Half-precision checkpoints are cast to fp32: relevance needs the full-precision forward."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def _classes_from_state(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """Number of outputs of the last 2-D weight (e.g. `fc.weight`), for plain state dicts."""
    matrices = [v for v in state_dict.values() if v.ndim == 2]
    return int(matrices[-1].shape[0]) if matrices else None


def _meta(path: Path, stored: dict[str, Any], given: dict[str, Any],
          state_dict: Mapping[str, torch.Tensor], model_def: str | None) -> dict[str, Any]:
    meta = {k: v for k, v in stored.items() if v is not None}
    meta.update({k: v for k, v in given.items() if v is not None})
    if "arch" not in meta and model_def is None:
        raise CheckpointError(f"{path}: a plain state dict needs --arch (e.g. resnet50) or --model-def")
    meta.setdefault("arch", model_def)
    if "num_classes" not in meta:
        meta["num_classes"] = _classes_from_state(state_dict)
        if meta["num_classes"] is None:
            raise CheckpointError(f"{path}: cannot tell the number of classes; pass --num-classes")
    meta["num_classes"] = int(meta["num_classes"])
    meta.setdefault("classes", [str(i) for i in range(meta["num_classes"])])
    meta.setdefault("class_names", None)
    if "resize" not in meta:
        meta["resize"] = meta.get("input_size") or 256
        if "input_size" not in meta and "crop" not in meta:
            meta["crop"] = 224
    meta.setdefault("crop", None)
    meta.setdefault("input_size", meta["crop"] or meta["resize"])
    meta.setdefault("mean", list(IMAGENET_MEAN))
    meta.setdefault("std", list(IMAGENET_STD))
    meta["mean"], meta["std"] = [float(m) for m in meta["mean"]], [float(s) for s in meta["std"]]
    if len(meta["mean"]) != 3 or len(meta["std"]) != 3:
        raise CheckpointError(f"{path}: mean and std need 3 values (one per RGB channel)")
    return meta


def _build(path: Path, meta: dict[str, Any], model_def: str | None) -> nn.Module:
    if model_def is not None:
        return _from_model_def(model_def, meta)
    try:
        return torchvision.models.get_model(meta["arch"], num_classes=meta["num_classes"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{path}: cannot build architecture {meta['arch']!r} with torchvision ({error})"
        ) from None


def _from_model_def(model_def: str, meta: dict[str, Any]) -> nn.Module:
    """`FILE.py:FUNCTION` -> FUNCTION(meta), for models torchvision does not know."""
    file, sep, function = model_def.rpartition(":")
    if not sep or not file or not function:
        raise CheckpointError(f"--model-def {model_def!r}: expected FILE.py:FUNCTION")
    source = Path(file)
    if not source.is_file():
        raise CheckpointError(f"--model-def {model_def!r}: no such file {source}")
    spec = importlib.util.spec_from_file_location(f"relprop_model_def_{source.stem}", source)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    builder = getattr(module, function, None)
    if not callable(builder):
        raise CheckpointError(f"--model-def {model_def!r}: {source} has no function {function!r}")
    model = builder(meta)
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"--model-def {model_def!r}: {function}(meta) did not return an nn.Module")
    return model


def _load_state(path: Path, model: nn.Module, state_dict: Mapping[str, torch.Tensor], arch: str) -> None:
    """Strict load, with the first mismatches named on one line instead of PyTorch's long report."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape
    ]
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
