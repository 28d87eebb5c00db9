"""Which device to run on: shared by the library (evaluation) and every command."""

from __future__ import annotations

from typing import Any

from relprop.errors import RelpropError


def resolve_device(text: str | None) -> Any:
    """`auto` (or None) picks the GPU when one is there; a device this machine cannot run on is
    one clear error, raised before the model is loaded."""
    import torch  # deferred: the CLI imports this module; keeps relprop --help fast

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
