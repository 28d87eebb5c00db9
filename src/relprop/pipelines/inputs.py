"""Which images a command processes: files and folders expanded into jobs, each with its own
output folder."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from relprop.images import find_images


class Job(NamedTuple):
    """One input image and the folder its outputs go to."""

    path: Path
    name: str  # output folder, relative to OUT


def plan_jobs(inputs: Iterable[str], command: str,
              exclude: Path | None = None) -> tuple[list[Job], list[str]]:
    """Expand the inputs into images with unique output folders; empty folders are failures.
    Folders are searched without `exclude` (the run's own output folder)."""
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
