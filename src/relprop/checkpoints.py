"""Write a relprop checkpoint: the format `relprop.load_model` reads (docs/checkpoints.md).

A checkpoint is a plain dict saved with `torch.save`, readable with `weights_only=True`: the
architecture's name, the classes, the preprocessing and a fp32 state dict. Saving refuses what
loading would refuse (an architecture whose model does not take these weights), so a file written
here always loads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from relprop.errors import CheckpointError
from relprop.evaluation.results import write_atomic
from relprop.modelinfo import CHECKPOINT_KEYS, ModelInfo, Preprocessing, as_preprocessing
from relprop.models import build_arch, classes_from_state, classifiers, state_mismatches


def save_checkpoint(model: nn.Module, path: str | Path, *, classes: Sequence[str],
                    preprocessing: Preprocessing | ModelInfo | Mapping[str, Any],
                    arch: str | None = None, class_names: Sequence[str] | None = None,
                    **extra: Any) -> Path:
    """Save `model` as a relprop checkpoint at `path`, whole or not at all; returns the path.

    `classes` are the ids in output order (wnids, or any labels), `class_names` readable names;
    `preprocessing` a `Preprocessing`, a `ModelInfo`, or a dict with `resize`, `crop`, `mean`,
    `std`. `arch` is the torchvision or timm name that builds the model; without it, timm's own
    record or the one torchvision architecture whose parameters have these shapes. `extra` keys
    (e.g. `val_acc=0.8`) are stored as they are; the loader ignores them.
    """
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
             for k, v in model.state_dict().items()}
    arch = arch or _arch_of(model, state)
    _check_builds(arch, state, len(classes))
    spec = _preprocessing(preprocessing)
    info = ModelInfo(arch=arch, num_classes=len(classes), classes=list(classes), preprocessing=spec,
                     class_names=None if class_names is None else list(class_names))
    clash = sorted(set(extra) & set(CHECKPOINT_KEYS))
    if clash:
        raise CheckpointError(f"save_checkpoint: {', '.join(clash)} are set by the other arguments")
    fields = {k: v for k, v in info.to_dict().items() if k in CHECKPOINT_KEYS}
    checkpoint = {**fields, **extra, "state_dict": state}
    path = Path(path)
    write_atomic(path, lambda temporary: torch.save(checkpoint, temporary))
    return path


def _preprocessing(spec: Preprocessing | ModelInfo | Mapping[str, Any]) -> Preprocessing:
    if isinstance(spec, Preprocessing | ModelInfo):
        return as_preprocessing(spec)
    if isinstance(spec, Mapping):
        return Preprocessing.from_dict(spec)
    raise CheckpointError(f"save_checkpoint: preprocessing must be a Preprocessing, a ModelInfo or a "
                          f"dict with resize, crop, mean, std; got {type(spec).__name__}")


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _arch_of(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """The name that builds `model`: timm records it; for torchvision, the one builder of the same
    class whose parameters have the same names and shapes (built on the meta device: no memory)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("architecture"):
        return f"timm/{cfg['architecture']}"
    wanted, kind = _shapes(state), type(model)
    matches = []
    for name in classifiers():
        builder = torchvision.models.get_model_builder(name)
        if builder.__annotations__.get("return") not in (kind.__name__, kind):
            continue
        with torch.device("meta"):
            candidate = builder(num_classes=_outputs(state))
        if type(candidate) is kind and _shapes(candidate.state_dict()) == wanted:
            matches.append(name)
    if len(matches) != 1:
        found = f" ({' or '.join(matches)} match)" if matches else ""
        raise CheckpointError(f"save_checkpoint: cannot tell the architecture of {kind.__name__}{found}; "
                              "pass arch= (a torchvision or timm name, e.g. arch='resnet18')")
    return matches[0]


def _outputs(state: Mapping[str, torch.Tensor]) -> int:
    return classes_from_state(state) or 1000


def _check_builds(arch: str, state: Mapping[str, torch.Tensor], num_classes: int) -> None:
    """Refuse to write what `load_model` would refuse: `arch` must take exactly these weights."""
    with torch.device("meta"):
        model = build_arch(arch, num_classes, source="save_checkpoint")
    missing, unexpected, wrong = state_mismatches(model.state_dict(), state)
    if missing or unexpected or wrong:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                  else wrong[0])
        raise CheckpointError(f"save_checkpoint: {arch} with {num_classes} classes does not take this "
                              f"model's weights ({detail}); check arch= and classes=")
