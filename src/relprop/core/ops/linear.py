"""Linear, ConvNd, ConvTransposeNd (modules or `F.linear`/`F.convNd` calls): the layer's rule
on its effective linear map, with any BatchNorm the canonizer folded into it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from relprop.core.linear_op import (
    LINEAR_FUNCTIONS,
    LINEAR_TYPES,
    LinearOp,
    as_linear_op,
    fold_batchnorm,
    functional_linear_op,
    module_forward,
)
from relprop.core.ops.base import Context, Op, Parents
from relprop.core.ops.passthrough import batchnorm_stats


@dataclass
class LinearInfo:
    is_input_layer: bool = False  # consumes the image (possibly through reshapes or pass-throughs)
    fold_after: fx.Node | None = None  # the BatchNorm right after it, folded into its rule
    fold_before: fx.Node | None = None  # the BatchNorm right before it, folded likewise


class Linear(Op):
    name = "linear"
    modules = LINEAR_TYPES
    functions = LINEAR_FUNCTIONS.keys()

    def make_info(self) -> LinearInfo:
        return LinearInfo()

    def forward(self, step, args: tuple, kwargs: dict, model: nn.Module) -> Any:
        if step.module is not None:
            return module_forward(step.module, args, kwargs)
        return super().forward(step, args, kwargs, model)

    def sees_the_input(self, step) -> bool:
        return step.info.is_input_layer

    def default_rule(self, step, strategies):
        return strategies.default_input_rule if step.info.is_input_layer else strategies.default_rule

    def annotate(self, step, plan) -> None:
        current = step.inputs[0]
        while plan.step_of[current].op.keeps_the_input_layer and plan.step_of[current].inputs:
            current = plan.step_of[current].inputs[0]
        step.info.is_input_layer = plan.step_of[current].is_input

    def relevance(self, step, values, R, context: Context) -> Parents:
        """With a BatchNorm folded in before the layer, the op reads the BatchNorm's input, and
        the relevance passes through the BatchNorm unchanged."""
        rule = context.rule_for(step)
        folded = step.info.fold_before
        source = step.inputs[0] if folded is None else context.step_of[folded].inputs[0]  # the BatchNorm's input
        op = self.effective_op(step, values, context)
        if rule.wants_nonnegative and context.step_of[source].nonnegative:
            return [(step.inputs[0], rule.relevance(op, values[source], R, nonnegative=True))]
        return [(step.inputs[0], rule.relevance(op, values[source], R))]

    @staticmethod
    def effective_op(step, values, context: Context) -> LinearOp:
        """The step's linear map with its adjacent BatchNorms folded in; cached per parameter
        version for modules (w⁺ and folding are then computed once, not per image)."""
        info: LinearInfo = step.info
        bns = [context.step_of[n] for n in (info.fold_before, info.fold_after) if n is not None]
        # Cacheable: everything comes from modules' tensors (a functional call's weight is computed
        # in the forward pass) and nothing from the input's shape (folding before a padded conv).
        cacheable = step.module is not None and info.fold_before is None and all(bn.module is not None for bn in bns)
        key = None
        if cacheable:
            sources = [step.module, *(bn.module for bn in bns)]
            key = tuple((t._version, t.data_ptr(), t.device) for m in sources for t in (*m.parameters(), *m.buffers()))
            cached = context.cache.get(step.node)
            if cached is not None and cached[0] == key:
                return cached[1]
        if step.module is not None:
            op = as_linear_op(step.module)
        else:
            args, kwargs = step.arguments(values)
            op = functional_linear_op(step.node.target, args, kwargs)
        if info.fold_before is not None:
            bn = context.step_of[info.fold_before]
            op = fold_batchnorm(op, batchnorm_stats(bn, values), before=True, input_shape=values[bn.node].shape)
        if info.fold_after is not None:
            op = fold_batchnorm(op, batchnorm_stats(context.step_of[info.fold_after], values))
        if key is not None:
            context.cache[step.node] = (key, op)
        return op
