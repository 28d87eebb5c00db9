"""Where the relevance of a constant operand goes (ViT's class token and position embedding, a
bias added by a function, the elements a constant pad adds: route.py): strategies a `Composite`
holds as ``constants=``.

- `KeepOnInput` (``"input"``): the input-dependent operand keeps it: all of it at an add; at a
  concatenation the constant's slices are absorbed by rescaling the others (the map keeps its
  shape, the total is conserved);
- `LeakToConstants` (``"leak"``): the constant takes its share, and that relevance is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.fx as fx
from torch import Tensor

from relprop.core.aliases import named
from relprop.errors import UnsupportedLayerError

Split = Callable[[Tensor, Tensor, Tensor, "int | None"], tuple[Tensor, Tensor]]


class ConstantsPolicy(Protocol):
    def at_add(self, R: Tensor, a: Tensor, b: Tensor, dependent: int, split: Split) -> Tensor:
        """The relevance of the input-dependent operand (index `dependent`) of `a + b`."""
        ...

    def at_cat(self, R: Tensor, pieces: list[tuple[object, Tensor, bool]], dim: int, where: str
               ) -> list[tuple[fx.Node, Tensor]]:
        """Relevance of a concatenation's node operands; `pieces` is (operand, R slice,
        depends on the input) per operand."""
        ...


@dataclass(frozen=True)
class KeepOnInput:
    def at_add(self, R: Tensor, a: Tensor, b: Tensor, dependent: int, split: Split) -> Tensor:
        return R

    def at_cat(self, R: Tensor, pieces: list[tuple[object, Tensor, bool]], dim: int, where: str
               ) -> list[tuple[fx.Node, Tensor]]:
        kept = [(operand, piece) for operand, piece, dependent in pieces if dependent]
        if len(kept) == len(pieces):
            return kept
        if dim % R.dim() == 0:
            raise UnsupportedLayerError(
                f"{where} concatenates a constant along the batch dimension; its relevance has no "
                "sample to go to: use constants='leak'")
        return list(zip([operand for operand, _ in kept], absorb(R, [piece for _, piece in kept]), strict=True))


@dataclass(frozen=True)
class LeakToConstants:
    def at_add(self, R: Tensor, a: Tensor, b: Tensor, dependent: int, split: Split) -> Tensor:
        shares = split(R, *torch.broadcast_tensors(a, b), None)
        return shares[dependent]

    def at_cat(self, R: Tensor, pieces: list[tuple[object, Tensor, bool]], dim: int, where: str
               ) -> list[tuple[fx.Node, Tensor]]:
        return [(operand, piece) for operand, piece, _ in pieces if isinstance(operand, fx.Node)]


CONSTANTS_POLICIES: dict[str, ConstantsPolicy] = {"input": KeepOnInput(), "leak": LeakToConstants()}


def constants_policy(constants: str | ConstantsPolicy) -> ConstantsPolicy:
    if not isinstance(constants, str):
        return constants
    return named(constants, CONSTANTS_POLICIES, "constants policy")


def absorb(R: Tensor, pieces: list[Tensor]) -> list[Tensor]:
    """The relevance of a cat's constant operands (ViT's class token) given to its
    input-dependent ones: per sample, their relevance scaled so that the total is R's (the map
    keeps its shape); where that scale is not positive and finite, added in proportion to |R|."""
    def total(t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], -1).sum(1)

    target = total(R)
    kept = sum(total(p) for p in pieces)
    scale = target / kept
    usable = torch.isfinite(scale) & (scale > 0)
    magnitude = sum(total(p.abs()) for p in pieces)
    out = []
    for piece in pieces:
        shape = (-1, *([1] * (piece.dim() - 1)))
        scaled = piece * torch.where(usable, scale, torch.ones_like(scale)).reshape(shape)
        spread = piece.abs() * torch.nan_to_num((target - kept) / magnitude).reshape(shape)
        out.append(torch.where(usable.reshape(shape), scaled, piece + spread))
    return out
