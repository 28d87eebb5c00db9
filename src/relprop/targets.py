"""The one place that resolves targets: None (the prediction), an int, N ints, or an
(N, num_outputs) float seed of output relevance (LRP only). Used by `relprop.LRP` and by every
method of `relprop.methods`, so each refuses a bad target with the same line."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from relprop.errors import TargetError

Target = int | Sequence[int] | Tensor | None


def as_index(text: str) -> int | None:
    """A `--target` text as a class index when it is an optional minus and ASCII digits, else None
    (a name or id). `str.isdigit` is not the test: it accepts '²', which `int` refuses."""
    stripped = text.strip()
    return int(stripped) if re.fullmatch(r"-?[0-9]{1,18}", stripped) else None


def show_option(text: str) -> str:
    """A user's option value for an error line: its repr (newlines, NULs escaped), cut short."""
    shown = repr(text)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def is_seed(target: Target) -> bool:
    """A float tensor is relevance to start from, not class indices."""
    return isinstance(target, Tensor) and target.is_floating_point()


def check_target(target: Target, n: int) -> None:
    """Refuse a target whose length cannot match a batch of `n` (before any forward pass)."""
    if is_seed(target) and target.dim() != 2:
        raise TargetError(f"a relevance seed must have shape (N, num_outputs), got {tuple(target.shape)}; "
                          "class indices must be integers")
    if isinstance(target, (Tensor, list, tuple)) and not (isinstance(target, Tensor) and target.dim() == 0):
        if len(target) != n:
            raise TargetError(f"got {len(target)} targets for {n} inputs")


def slice_target(target: Target, start: int, size: int) -> Target:
    """The target of the chunk `[start, start + size)` of a batch."""
    if isinstance(target, (list, tuple)) or (isinstance(target, Tensor) and target.dim() > 0):
        return target[start:start + size]
    return target


def target_classes(target: Target, logits: Tensor) -> Tensor:
    """Class index per sample (on the logits' device): the prediction when `target` is None."""
    n, num_classes = logits.shape[0], logits.shape[1]
    if target is None:
        return logits.argmax(1)
    if isinstance(target, bool):
        raise TargetError(f"target must be a class index, got {target!r}")
    try:
        classes = torch.as_tensor(target)
    except (TypeError, ValueError) as error:
        raise TargetError(f"target must be None, an int, N ints or an (N, {num_classes}) seed: {error}") from None
    if classes.is_floating_point() or classes.dtype == torch.bool or classes.dim() > 1:
        raise TargetError(f"target must be None, an int, N ints or an (N, {num_classes}) float seed; "
                          f"got a tensor of shape {tuple(classes.shape)} and dtype {classes.dtype}")
    if classes.dim() == 0:  # one class for the whole batch
        classes = classes.reshape(1).expand(n)
    if classes.numel() != n:
        raise TargetError(f"got {classes.numel()} targets for {n} inputs")
    classes = classes.long()
    bad = (classes < 0) | (classes >= num_classes)
    if bool(bad.any()):
        raise TargetError(f"target {int(classes[bad][0])} is out of range for a model with {num_classes} outputs")
    return classes.to(logits.device)


def resolve_target(model: nn.Module, inputs: Tensor, target: Target, logits: Tensor | None = None) -> Tensor:
    """Class index per sample for a method that needs classes; runs the model when no logits."""
    if logits is None:
        with torch.no_grad():
            logits = model(inputs)
    return target_classes(target, logits)


def initial_relevance(logits: Tensor, target: Target) -> Tensor:
    """Softmax probability of the explained class, zero elsewhere; or the given seed."""
    n, num_classes = logits.shape
    if is_seed(target):
        if tuple(target.shape) != (n, num_classes):
            raise TargetError(
                f"a relevance seed must have shape (N, num_outputs) with {num_classes} outputs, "
                f"got {target.shape[-1] if target.dim() else 0} columns"
            )
        return target.to(device=logits.device, dtype=torch.float32)
    classes = target_classes(target, logits)
    probabilities = torch.softmax(logits, dim=1)
    seed = torch.zeros_like(probabilities)
    rows = torch.arange(n, device=logits.device)
    seed[rows, classes] = probabilities[rows, classes]
    return seed
