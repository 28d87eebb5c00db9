"""Residual adds (`operator.add`, `torch.add`, `.add`): where Relevance Splitting happens. Two
input-dependent operands share the relevance by the composite's split strategy (an identity
skip gets nothing when `identity_skips=False`); `x + constant` follows the constants policy.

Subtractions (`operator.sub`, `torch.sub`, `.sub`; PoolFormer's `pool(x) - x`) and `alpha=` are
the same sum of the scaled operands, `a + (-b)`: the split sees the terms that are summed, so
with the signed split at ε = 0 the relevance is gradient × input (the terms' own shares)."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from relprop.core.ops.base import Context, KeepsSign, Op, Parents

FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.sub, torch.sub}
METHODS = {"add", "add_", "sub"}
SUBTRACTIONS = {operator.sub, torch.sub, "sub"}  # in-place ones are made out-of-place when tracing


@dataclass
class AddInfo:
    skip: int | None = None  # the operand that is an identity skip (computed from the other one)


class Add(KeepsSign, Op):
    name = "add"
    reads_its_arguments = True
    functions, methods = FUNCTIONS, METHODS

    def make_info(self) -> AddInfo:
        return AddInfo()

    def annotate(self, step, plan) -> None:
        step.info.skip = plan.computed_from_the_other(step)

    def output_is_fresh(self, step) -> bool:
        """`a + b`, `a - b`: a new tensor (tracing makes in-place adds out of place; one left in
        place returns its operand, which is not fresh)."""
        return step.node.target not in (operator.iadd, "add_")

    def output_nonnegative(self, step, parents: list[bool]) -> bool:
        plain = step.node.target not in SUBTRACTIONS and step.node.kwargs.get("alpha", 1) == 1
        return plain and len(step.inputs) == 2 and super().output_nonnegative(step, parents)

    def relevance(self, step, values, R, context: Context) -> Parents:
        strategies = context.strategies
        first, second = step.node.args[0], step.node.args[1]
        a, b = step.operand(first, values), step.operand(second, values)
        factor = _second_factor(step, values)
        if factor is not None:  # a - b, a + alpha·b: split between the terms summed
            b = b * factor
        dependent = [arg for arg in (first, second) if isinstance(arg, fx.Node) and arg in step.inputs]
        if len(dependent) == 1:
            index = 0 if first is dependent[0] else 1
            R_dependent = strategies.constants.at_add(R, a, b, index, strategies.split)
            return [(dependent[0], R_dependent.sum_to_size(values[dependent[0]].shape))]
        skip = step.info.skip
        if skip is not None and not strategies.identity_skips:  # the paper's ablation
            R_a, R_b = (torch.zeros_like(R), R) if skip == 0 else (R, torch.zeros_like(R))
        else:
            R_a, R_b = strategies.split(R, a, b, skip)
        return [(first, R_a.sum_to_size(a.shape)), (second, R_b.sum_to_size(b.shape))]


def _second_factor(step, values) -> float | None:
    """What the second operand is multiplied by before the sum (-1 for a subtraction, `alpha`),
    or None for a plain add."""
    node = step.node
    alpha = node.kwargs.get("alpha", 1)
    alpha = values.get(alpha, alpha) if isinstance(alpha, fx.Node) else alpha
    factor = -alpha if node.target in SUBTRACTIONS else alpha
    return None if factor == 1 else float(factor)
