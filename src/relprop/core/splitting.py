"""Relevance Splitting at residual adds (Otsuki et al., ECCV 2024) and the plain-LRP split.

At `out = h_a + h_b` the relevance of `out` is shared between the two operands:
- ``ratio``: by magnitude, `R_a = R·|h_a| / (|h_a| + |h_b|)` (the paper's method);
- ``symmetric``: `R/2` each;
- ``signed``: by signed contribution, `R_a = R·h_a / (h_a + h_b)` (what LRP libraries
  without splitting do; it can blow up where the two operands cancel).
With ``identity_skips=False`` an identity skip receives nothing, as in the paper's ablation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SPLITS = ("ratio", "symmetric", "signed")


@dataclass(frozen=True)
class Splitter:
    """Shares the relevance of a two-operand add; `skip` names the identity-skip operand."""

    mode: str = "ratio"
    identity_skips: bool = True
    reference: bool = False  # the authors' numerics: no stabilizer, (1 - ratio) for the skip
    epsilon: float = 1e-6  # stabilizer of the signed split only

    def __post_init__(self) -> None:
        if self.mode not in SPLITS:
            raise ValueError(f"unknown split {self.mode!r}; choose one of: {', '.join(SPLITS)}")

    def __call__(self, R: Tensor, a: Tensor, b: Tensor, skip: int | None) -> tuple[Tensor, Tensor]:
        """Relevance of (a, b); `skip` is 0 or 1 when that operand is an identity skip."""
        if skip is not None and not self.identity_skips:
            return (torch.zeros_like(R), R) if skip == 0 else (R, torch.zeros_like(R))
        if self.reference:
            return self._reference(R, a, b, skip)
        share_a = self._share(a, b)
        R_a = share_a.mul_(R) if share_a.shape == R.shape else share_a * R
        return R_a, R - R_a

    def _share(self, a: Tensor, b: Tensor) -> Tensor:
        if self.mode == "symmetric":
            return torch.full_like(a + b, 0.5)
        if self.mode == "signed":
            z = a + b
            z = z + self.epsilon * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))
            return a / z
        magnitude_a, magnitude_b = a.abs(), b.abs()
        if a.shape != b.shape:  # broadcasting add: no in-place shortcuts
            return torch.nan_to_num(magnitude_a / (magnitude_a + magnitude_b), nan=0.5)
        # in place: these are full-size temporaries, and allocating them is what costs
        total = magnitude_b.add_(magnitude_a)
        # 0/0 (both operands zero) is the only NaN here: split that relevance evenly
        return magnitude_a.div_(total).nan_to_num_(nan=0.5)

    def _reference(self, R: Tensor, a: Tensor, b: Tensor, skip: int | None) -> tuple[Tensor, Tensor]:
        """The reference code's arithmetic: `ratio = |m|/(|s|+|m|)`, `R_m = ratio·R`,
        `R_s = (1 - ratio)·R`, with m the residual branch (0/0 gives NaN, as there)."""
        branch, shortcut = (b, a) if skip == 0 else (a, b)
        if self.mode == "symmetric":
            ratio = torch.full_like(R, 0.5)
        else:
            ratio = branch.abs() / (shortcut.abs() + branch.abs())
        R_branch, R_skip = ratio * R, (1 - ratio) * R
        return (R_skip, R_branch) if skip == 0 else (R_branch, R_skip)
