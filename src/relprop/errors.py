"""Exceptions with one-line, actionable messages (the CLI prints them as they are)."""

from __future__ import annotations


class RelpropError(Exception):
    """Base class: every error relprop raises on purpose derives from it."""


class UnsupportedLayerError(RelpropError, TypeError):
    """A module or function has no relevance rule."""


class OpFailure(UnsupportedLayerError):
    """An op failed on a node it had claimed (a case it does not handle): the message names the
    node and the op, the original error is the cause."""


class TraceError(RelpropError, RuntimeError):
    """The model could not be traced into a graph."""


class TargetError(RelpropError, ValueError):
    """A target (class index or seed) does not fit the model's output."""


class InputError(RelpropError, ValueError):
    """An input tensor has the wrong shape or type."""


class ConfigError(RelpropError, ValueError):
    """An option, rule, composite or strategy name is unknown or does not fit the others."""


class ImageError(RelpropError, ValueError):
    """An image file is missing, corrupt, unsupported or too large."""


class CheckpointError(RelpropError, ValueError):
    """A weights file cannot be loaded into the model it claims to fit."""


class FidelityError(RelpropError, RuntimeError):
    """The engine's forward pass differs from the model's own: its relevance would explain
    another function, so none is returned."""


def first_line(error: BaseException, default: str | None = None) -> str:
    """The first non-empty line of an error's message (tracebacks of torch and fx run long);
    `default` (the error's type name unless given) when the message is empty."""
    text = str(error).strip()
    if text:
        return text.splitlines()[0]
    return type(error).__name__ if default is None else default


class DiskFullError(RelpropError, OSError):
    """A file of a run could not be written for want of space (ENOSPC, EFBIG, EDQUOT); what was
    written before is intact and the same command resumes."""


class BusyError(RelpropError, RuntimeError):
    """An output folder is in use by another run (its lock is held)."""
