"""What the zoo benchmarks share: building a torchvision or timm model by name, giving random weights
realistic scales, and one verdict per explanation attempt.

`benchmarks/zoo.py` (every model, one child process each) and `benchmarks/zoo_parity.py` (two source
trees, model by model) import it; it imports relprop only inside `verdict`, so a child can put the
tree it tests first on `sys.path` before that import.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

NUM_CLASSES = 10
SOURCES = ("torchvision", "timm")


def build_model(source: str, name: str, **kwargs: Any) -> nn.Module:
    """A randomly initialized classifier with `NUM_CLASSES` outputs (no download)."""
    if source == "torchvision":
        import torchvision  # deferred: the parity worker imports this module before its tree's relprop
        return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **kwargs)
    if source == "timm":
        import timm  # deferred: optional for torchvision-only runs
        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
    raise KeyError(f"unknown model source {source!r}; choose one of {SOURCES}")


def parameter_count(source: str, name: str) -> int:
    """Parameters of the model built on the meta device (no memory, no initialization cost)."""
    return sum(p.numel() for p in meta_model(source, name).parameters())


def meta_model(source: str, name: str) -> nn.Module:
    """The model built on the meta device (no memory, no initialization cost)."""
    with torch.device("meta"):
        return build_model(source, name)


def is_classifier(model: nn.Module) -> bool:
    """Whether the model took `num_classes`: timm's encoders without a head (gemma4_vit_*_enc,
    whose constructor filters num_classes out and sets 0) return tokens, not class scores."""
    return getattr(model, "num_classes", NUM_CLASSES) == NUM_CLASSES


def redraw_scales(model: nn.Module, generator: torch.Generator) -> list[str]:
    """Random initialization zeroes or shrinks what training grows: timm's `zero_init_last` BatchNorm
    weights, layer scales (1e-5/1e-6), NFNet skip gains. A branch scaled by ~0 contributes ~0, so an
    explanation of it proves nothing. Every parameter that is constant and tiny (|v| < 1e-3,
    biases aside) is redrawn: 1-D scales uniformly in [0.1, 1] (trained layer scales' range), weights
    with std 0.02 (a ViT's init). Returns the redrawn parameters' names."""
    redrawn = []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or not parameter.is_floating_point() or parameter.numel() == 0:
                continue
            flat = parameter.detach().flatten()
            if float(flat.abs().max()) >= 1e-3 or float(flat.max() - flat.min()) > 1e-6:
                continue
            if parameter.dim() <= 1 or parameter.numel() == parameter.shape[-1]:
                fresh = torch.rand(parameter.shape, generator=generator) * 0.9 + 0.1
            else:
                fresh = torch.randn(parameter.shape, generator=generator) * 0.02
            parameter.copy_(fresh.to(parameter.dtype))
            redrawn.append(name)
    return redrawn


def calibrate_batchnorm(model: nn.Module, shape: tuple[int, ...], generator: torch.Generator,
                        passes: int = 3, batch: int = 4) -> int:
    """Running statistics of random data, as training would leave them: a few forward passes with
    only the BatchNorms in train mode (cumulative average), then eval. Without it, random weights
    with unit running variance make activations grow by orders of magnitude per block. Returns the
    number of BatchNorms calibrated."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    model.eval()
    if not norms:
        return 0
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    with torch.no_grad():
        for _ in range(passes):
            model(torch.randn(batch, *shape, generator=generator))
    model.eval()
    return len(norms)


def realistic(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> dict[str, Any]:
    """Random weights made realistic in place (scales redrawn, BatchNorm calibrated on `shape`)."""
    generator = torch.Generator().manual_seed(seed)
    redrawn = redraw_scales(model, generator)
    return {"redrawn": len(redrawn), "batchnorms": calibrate_batchnorm(model, shape, generator)}


def verdict(run) -> tuple[str, str]:
    """("explained" | "refused" | "crash", detail) of calling `run()`: a `RelpropError` is a refusal
    with its one line; any other exception is a crash, a failure of relprop, named by its type."""
    from relprop.errors import RelpropError, first_line  # deferred: its tree goes first on sys.path
    try:
        run()
    except RelpropError as error:
        return "refused", first_line(error)
    except Exception as error:  # noqa: BLE001 - a crash is the finding, recorded with its type
        return "crash", f"{type(error).__name__}: {first_line(error, default='')}"
    return "explained", ""


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson r of two flattened maps (nan when one is constant)."""
    stacked = torch.stack([a.flatten().double(), b.flatten().double()])
    r = float(torch.corrcoef(stacked)[0, 1])
    return r if math.isfinite(r) else float("nan")
