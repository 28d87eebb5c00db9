"""Which images a command processes: files and folders expanded into jobs, each with its own
output folder."""

from __future__ import annotations

import re
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
    """`ROOT/a/b.jpg` -> `a/b`; a file named directly -> its stem; always a path inside OUT
    (`safe_part` on every part)."""
    relative = path.relative_to(root) if root is not None else Path(path.name)
    parts = relative.parts[:-1] + (Path(relative.parts[-1]).stem if relative.parts else "",)
    return "/".join(safe_part(part) for part in parts)


_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")


def safe_part(name: str) -> str:
    """One file or folder name derived from an input, made safe to join under OUT: control
    characters (newlines, NUL), slashes and backslashes become `_`, and `.`, `..` or an empty name
    (the stem of `..jpg` is `..`: OUT/.. is OUT's parent) become underscores."""
    cleaned = _UNSAFE.sub("_", name)
    if cleaned in ("", ".", ".."):
        return "_" * max(len(cleaned), 1)
    return cleaned


def _unique(name: str, taken: set[str]) -> str:
    """`a.jpg` and `a.png` in one folder must not overwrite each other's outputs."""
    candidate, n = name, 1
    while candidate.lower() in taken:
        n += 1
        candidate = f"{name}-{n}"
    taken.add(candidate.lower())
    return candidate
