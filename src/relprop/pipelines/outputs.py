"""Output folders of the image commands: checked before any work, and cleaned of stale files.

Each run of `explain` or `detect` writes OUT/manifest.json, the list of files it wrote. A later
run into the same OUT removes the files the previous manifest lists and the new run did not
write again (maps of methods no longer asked for, folders of images no longer given, an old
overview.png), so OUT shows one run, never a mix. Files no manifest lists (the user's own, or
those of runs before manifests existed) are never touched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from relprop.errors import RelpropError

MANIFEST = "manifest.json"


def prepare_out(text: str, option: str = "--out") -> Path:
    """Create the output folder and prove it writable, or fail on one line (before the model loads)."""
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise RelpropError(f"{option} {out}: exists and is not a folder")
    _check_writable(out, f"{option} {out}")
    return out


def prepare_out_file(text: str, option: str = "--out") -> Path:
    """A file to write at the end of a long run (fit-bow's model): refuse a folder, or a folder
    that cannot be written, now rather than after the work."""
    path = Path(text)
    if path.is_dir():
        raise RelpropError(f"{option} {path}: is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise RelpropError(f"{option} {path}: exists and is not a regular file")
    _check_writable(path.parent, f"{option} {path}")
    return path


def _check_writable(folder: Path, what: str) -> None:
    """Create `folder` and write a probe file in it, or say in one line why that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".relprop-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise RelpropError(f"{what}: cannot write there ({error.strerror or type(error).__name__})") from None


@contextmanager
def writing(out: Path) -> Iterator[None]:
    """Turn an OSError while writing under `out` (a full disk, a read-only mount) into one line
    naming the file, or `out` when the error does not say (a failed write() has no file name)."""
    try:
        yield
    except OSError as error:
        where = error.filename if error.filename is not None else out
        raise RelpropError(f"{where}: cannot write the outputs "
                           f"({error.strerror or type(error).__name__}); the run stops here") from None


class Manifest:
    """The files one run writes under OUT; `finish` removes the previous run's stale files."""

    def __init__(self, out: Path, command: str) -> None:
        self.out, self.command = out, command
        self.files: set[str] = {MANIFEST}
        self.previous = _read(out / MANIFEST)

    def add(self, path: Path) -> Path:
        """Record a file this run wrote (returns it, to wrap a save call); a path that would leave
        OUT is refused (names derived from inputs are made safe in `pipelines.inputs`)."""
        relative = path.relative_to(self.out)
        if ".." in relative.parts:
            raise RelpropError(f"{path}: refused, it is outside {self.out}")
        self.files.add(relative.as_posix())
        return path

    def finish(self) -> list[str]:
        """Remove what the previous run wrote and this one did not; write this run's manifest."""
        removed = []
        root = self.out.resolve()
        for name in sorted(self.previous - self.files):
            path = (self.out / name).resolve()
            if path.is_relative_to(root) and path.is_file():
                path.unlink()
                removed.append(name)
                _remove_empty_parents(path.parent, root)
        (self.out / MANIFEST).write_text(json.dumps(
            {"command": self.command, "files": sorted(self.files)}, indent=1) + "\n")
        return removed


def _read(path: Path) -> set[str]:
    """The previous manifest's files; an unreadable manifest protects nothing and removes nothing."""
    try:
        files = json.loads(path.read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {name for name in files if isinstance(name, str)}


def _remove_empty_parents(folder: Path, root: Path) -> None:
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()  # only succeeds when empty
        except OSError:
            return
        folder = folder.parent
