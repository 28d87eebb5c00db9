"""Relevance Splitting at residual adds (Otsuki et al., ECCV 2024) and the plain-LRP split, as
strategies a `Composite` holds (``split=RatioSplit()`` or its name ``split="ratio"``).

At `out = h_a + h_b` the relevance of `out` is shared between the two operands:
- `RatioSplit` (``"ratio"``): by magnitude, `R_a = R·|h_a| / (|h_a| + |h_b|)` (the paper's method);
- `SymmetricSplit` (``"symmetric"``): `R/2` each;
- `SignedSplit` (``"signed"``): by signed contribution, `R_a = R·h_a / (h_a + h_b)` (what LRP
  libraries without splitting do; it can blow up where the two operands cancel);
- `ReferenceSplit`: the authors' code's arithmetic for either of the first two.
Whether identity skips take part (the paper's ablation) is the composite's `identity_skips`.
A strategy of your own: any object with `__call__(R, a, b, skip) -> (R_a, R_b)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from relprop.core.aliases import named
from relprop.core.numerics import TINY, safe_divide, stabilize
from relprop.errors import ConfigError


class SplitStrategy(Protocol):
    """Shares the relevance of a two-operand add; `skip` is 0 or 1 when that operand is an
    identity skip (None otherwise)."""

    def __call__(self, R: Tensor, a: Tensor, b: Tensor, skip: int | None) -> tuple[Tensor, Tensor]: ...


class _ShareSplit:
    """R_a = share(a, b)·R, R_b = R − R_a: conserves by construction."""

    def __call__(self, R: Tensor, a: Tensor, b: Tensor, skip: int | None) -> tuple[Tensor, Tensor]:
        share_a = self.share(a, b)
        R_a = share_a.mul_(R) if share_a.shape == R.shape else share_a * R
        return R_a, R - R_a

    def share(self, a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class RatioSplit(_ShareSplit):
    """By magnitude (the paper's method); where both operands are zero, evenly."""

    def share(self, a: Tensor, b: Tensor) -> Tensor:
        magnitude_a, magnitude_b = a.abs(), b.abs()
        if a.shape != b.shape:  # broadcasting add: no in-place shortcuts
            return torch.nan_to_num(magnitude_a / (magnitude_a + magnitude_b), nan=0.5)
        # in place: these are full-size temporaries, and allocating them is what costs
        total = magnitude_b.add_(magnitude_a)
        # 0/0 (both operands zero) is the only NaN here: split that relevance evenly
        return magnitude_a.div_(total).nan_to_num_(nan=0.5)


@dataclass(frozen=True)
class SymmetricSplit(_ShareSplit):
    """Half to each operand."""

    def share(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.full_like(a + b, 0.5)


@dataclass(frozen=True)
class SignedSplit(_ShareSplit):
    """By signed contribution, stabilized (plain LRP's z-rule at the add)."""

    epsilon: float = 1e-6

    def share(self, a: Tensor, b: Tensor) -> Tensor:
        z = stabilize(a + b, self.epsilon)
        if self.epsilon > TINY and z.shape == a.shape:  # |z| >= ε: no zeros to mask, and z is ours
            return torch.div(a, z, out=z)
        # ε = 0 (LRP-0): where the sum is exactly 0 (two dead ReLU branches), evenly, not 0/0 = NaN
        share, zero = safe_divide(a, z)
        return share.masked_fill_(zero, 0.5)


@dataclass(frozen=True)
class ReferenceSplit:
    """The reference code's arithmetic: `ratio = |m|/(|s|+|m|)` (or 1/2 when `symmetric`),
    `R_m = ratio·R`, `R_s = (1 - ratio)·R`, with m the residual branch (0/0 gives NaN, as there)."""

    symmetric: bool = False

    def __call__(self, R: Tensor, a: Tensor, b: Tensor, skip: int | None) -> tuple[Tensor, Tensor]:
        branch, shortcut = (b, a) if skip == 0 else (a, b)
        if self.symmetric:
            ratio = torch.full_like(R, 0.5)
        else:
            ratio = branch.abs() / (shortcut.abs() + branch.abs())
        R_branch, R_skip = ratio * R, (1 - ratio) * R
        return (R_skip, R_branch) if skip == 0 else (R_branch, R_skip)


# name -> (strategy, its reference-numerics twin); the names are the composite's aliases
SPLITS: dict[str, tuple[SplitStrategy, SplitStrategy | None]] = {
    "ratio": (RatioSplit(), ReferenceSplit()),
    "symmetric": (SymmetricSplit(), ReferenceSplit(symmetric=True)),
    "signed": (SignedSplit(), None),
}


def split_strategy(split: str | SplitStrategy, reference: bool = False) -> SplitStrategy:
    """The strategy of a name (with the reference numerics when asked), or a strategy as it is."""
    if not isinstance(split, str):
        return split
    plain, reference_twin = named(split, SPLITS, "split")
    if reference and reference_twin is None:
        raise ConfigError(f"the reference preset has no {split!r} split (the authors' code splits by "
                          "ratio or symmetrically)")
    return reference_twin if reference else plain
