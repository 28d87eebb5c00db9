"""Pieces the image commands share: which images to process, where outputs go, which device."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from relprop.errors import RelpropError


class Job(NamedTuple):
    """One input image and the folder its outputs go to."""

    path: Path
    name: str  # output folder, relative to OUT


def plan_jobs(inputs: Iterable[str], command: str,
              exclude: Path | None = None) -> tuple[list[Job], list[str]]:
    """Expand the inputs into images with unique output folders; empty folders are failures.
    Folders are searched without `exclude` (the run's own output folder)."""
    from relprop.images import find_images

    jobs: list[Job] = []
    failures: list[str] = []
    taken: set[str] = set()
    for raw in inputs:
        found = list(find_images([raw], exclude=exclude))
        if not found:
            failures.append(f"{raw}: no image files in this folder")
            print(f"relprop {command}: error: {failures[-1]}", file=sys.stderr)
        for path, root in found:
            jobs.append(Job(path, _unique(_output_name(path, root), taken)))
    return jobs, failures


def _output_name(path: Path, root: Path | None) -> str:
    """`ROOT/a/b.jpg` -> `a/b`; a file named directly -> its stem."""
    relative = path.relative_to(root) if root is not None else Path(path.name)
    return relative.with_suffix("").as_posix()


def _unique(name: str, taken: set[str]) -> str:
    """`a.jpg` and `a.png` in one folder must not overwrite each other's outputs."""
    candidate, n = name, 1
    while candidate.lower() in taken:
        n += 1
        candidate = f"{name}-{n}"
    taken.add(candidate.lower())
    return candidate


def resolve_device(text: str | None) -> Any:
    """`auto` (or None) picks the GPU when one is there; a device this machine cannot run on is
    one clear error, raised before the model is loaded."""
    import torch

    if text is None or text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise RelpropError(f"--device {text}: not a device (use auto, cpu, cuda, cuda:0, ...)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RelpropError(f"--device {text}: no CUDA GPU is available here; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise RelpropError(f"--device {text}: this machine has {count} CUDA GPU(s), "
                               f"cuda:0..cuda:{count - 1}")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise RelpropError(f"--device {text}: Apple's MPS backend is not available here; "
                               "use --device cpu")
        return device
    raise RelpropError(f"--device {text}: relprop runs on cpu, cuda or mps, not {device.type}")
