"""Products with a constant or a gate: `x * c`, `x / c`, `x * gate(x)`. All relevance stays with
the input-dependent operand (the gate, computed from the other operand, gets none); a product of
two unrelated input-dependent tensors has no rule here."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from relprop.core.ops.base import Context, Op, Parents
from relprop.core.trace import in_module
from relprop.errors import UnsupportedLayerError

FUNCTIONS = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul}
METHODS = {"mul", "mul_", "div", "div_"}


@dataclass
class ScaleInfo:
    gate: int | None = None  # the operand computed from the other one: it gets no relevance


class Scale(Op):
    name = "scale"
    functions, methods = FUNCTIONS, METHODS

    def make_info(self) -> ScaleInfo:
        return ScaleInfo()

    def annotate(self, step, plan) -> None:
        source = plan.computed_from_the_other(step)
        step.info.gate = None if source is None else 1 - source

    def relevance_parents(self, step) -> list[fx.Node]:
        if step.info.gate is not None:
            return [step.node.args[1 - step.info.gate]]
        return step.inputs

    def relevance(self, step, values, R, context: Context) -> Parents:
        parents = self.relevance_parents(step)
        if len(parents) != 1:
            raise UnsupportedLayerError(
                f"'{step.node.name}'{in_module(step.node)} multiplies two unrelated input-dependent "
                "tensors; relprop has no rule for that"
            )
        return [(parents[0], R.sum_to_size(values[parents[0]].shape))]
