"""Saving and loading a fitted BoW pipeline without pickle.

Format (`.bow.npz`): a NumPy zip archive read with `allow_pickle=False`, holding only numeric and
unicode arrays: `centres`, `support`, `coef`, `intercept`, `classes`, and `relprop_bow_header`, a
JSON text with a magic string, the format version, the configuration, and the sha256 of everything
else (arrays: name, dtype, shape, bytes; header: its own JSON without the hash). Nothing in it is
ever executed or unpickled. The hash detects accidents (a truncated copy, a flipped bit); it is no
signature: anyone who edits the file can recompute it. What protects the maps is that loading
checks the content itself: every array's shape against the others and the configuration (the
centres' width is the descriptor's), every number finite, the classes one per coefficient row.
A file failing any check is refused with one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from relprop.bow.model import BoWModel
from relprop.defaults import IMAGENET_MEAN, IMAGENET_STD
from relprop.errors import CheckpointError, first_line

MAGIC = "relprop-bow"
VERSION = 1
HEADER = "relprop_bow_header"
SUFFIX = ".bow.npz"
_ARRAYS = ("centres", "support", "coef", "intercept", "classes")


def _digest(arrays: dict[str, np.ndarray], header: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    digest.update(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode())
    return digest.hexdigest()


def save(pipeline: Any, path: str | Path) -> Path:
    """Write `pipeline` (a `BoWPipeline`) to `path` (the `.bow.npz` suffix is recommended)."""
    from relprop.bow.pipeline import config_dict  # deferred: scikit-learn, OpenCV (see load)

    arrays = {"centres": pipeline.centres, "support": pipeline.support, "coef": pipeline.coef,
              "intercept": pipeline.intercept, "classes": np.array(pipeline.classes, dtype=str)}
    header: dict[str, Any] = {"magic": MAGIC, "version": VERSION, "config": config_dict(pipeline.config),
                              "sigma": pipeline.sigma, "gamma": pipeline.gamma, "info": pipeline.info}
    header["sha256"] = _digest(arrays, header)
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"--out {path}: is a folder; give a file name such as model.bow.npz")
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:  # a temporary file renamed over the target: a full disk never leaves half a model
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as handle:  # np.savez would append .npz to a name without it
            np.savez(handle, **arrays, **{HEADER: np.array(json.dumps(header))})
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"--out {path}: cannot write the model "
                              f"({error.strerror or type(error).__name__})") from None
    return path


def is_bow_file(path: str | Path) -> bool:
    """True for a zip archive with our header member (a torch .pt zip has none)."""
    path = Path(path)
    try:
        if not path.is_file() or not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return f"{HEADER}.npy" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def load(path: str | Path) -> Any:
    """The `BoWPipeline` saved at `path`; anything not written by `save` is a `CheckpointError`."""
    # deferred: models asks is_bow_file of every checkpoint; scikit-learn and OpenCV load for BoW files only
    from relprop.bow.pipeline import BoWPipeline, config_from_dict

    path = Path(path)
    if not is_bow_file(path):
        raise CheckpointError(f"{path}: not a relprop BoW model file (relprop fit-bow writes them)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            files = {name: archive[name] for name in archive.files}
        header = json.loads(str(files.pop(HEADER)))
    except Exception as error:  # zip, format and JSON errors all mean "not ours"
        raise CheckpointError(f"{path}: unreadable BoW model file ({type(error).__name__})") from None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise CheckpointError(f"{path}: not a relprop BoW model file (wrong magic)")
    if header.get("version") != VERSION:
        raise CheckpointError(f"{path}: BoW format version {header.get('version')!r}; this relprop "
                              f"reads version {VERSION}")
    if sorted(files) != sorted(_ARRAYS) or header.get("sha256") != _digest(files, header):
        raise CheckpointError(f"{path}: BoW model file is damaged or was modified (hash mismatch)")
    try:
        config = config_from_dict(header["config"])
        pipeline = BoWPipeline(config, files["centres"], float(header["sigma"]),
                               float(header["gamma"]), files["support"], files["coef"],
                               files["intercept"], [str(c) for c in files["classes"]],
                               dict(header.get("info") or {}))
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as error:
        raise CheckpointError(f"{path}: inconsistent BoW model file ({first_line(error)})") from None
    problem = _inconsistency(pipeline)
    if problem:
        raise CheckpointError(f"{path}: inconsistent BoW model file: {problem}")
    return pipeline


def _inconsistency(pipeline: Any) -> str | None:
    """What makes a pipeline's arrays unusable together (None: nothing). The hash cannot say it:
    anyone can recompute it."""
    from relprop.bow.features import Grid, local_features  # deferred: OpenCV (see load)

    config = pipeline.config
    arrays = {name: getattr(pipeline, name) for name in ("centres", "support", "coef", "intercept")}
    for name, array in arrays.items():
        if array.dtype.kind not in "fiu":
            return f"{name} holds {array.dtype} values, not numbers"
        if not np.isfinite(array).all():
            return f"{name} holds NaN or infinite values"
    for name in ("sigma", "gamma"):
        value = getattr(pipeline, name)
        if not (np.isfinite(value) and value > 0):
            return f"{name} {value} is not a finite number above 0"
    support = arrays["support"]
    width = local_features(np.zeros((config.patch, config.patch, 3)), Grid(config.patch, config.stride),
                           config.colour)[0].shape[1]
    classes = len(pipeline.classes)
    expected = {"centres": (config.words, width), "support": (support.shape[0] if support.ndim else -1,
                                                              config.words),
                "coef": (classes, support.shape[0] if support.ndim else -1), "intercept": (classes,)}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            return (f"{name} has shape {arrays[name].shape}, expected {shape} ({config.words} words of "
                    f"{width} values, {classes} classes)")
    if classes < 2 or len(set(pipeline.classes)) != classes:
        return f"{classes} class(es), {len(set(pipeline.classes))} distinct; a classifier needs 2 or more"
    if support.shape[0] < 1:
        return "no support vectors"
    return None


def load_bow_model(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(`BoWModel`, meta) in the form of `relprop.models.load_model`, for the CLI's --weights."""
    pipeline = load(path)
    size = int(pipeline.config.size)
    meta = {"arch": "bow", "num_classes": len(pipeline.classes), "classes": list(pipeline.classes),
            "class_names": None, "input_size": size, "resize": size, "crop": None,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "val_acc": pipeline.info.get("val_acc")}
    return BoWModel(pipeline, meta["mean"], meta["std"]).eval(), meta
