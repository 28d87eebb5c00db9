"""A module, function or tensor method the user gave a rule (`rules={MyLayer: rule}`): the
node stays whole (a graph leaf for modules) and the rule maps its output relevance to its
first input."""

from __future__ import annotations

import torch.fx as fx
from torch import Tensor, nn

from relprop.core.ops.base import Context, Op, Parents, describe
from relprop.core.ruleset import RuleSet
from relprop.core.trace import LeafPolicy
from relprop.errors import UnsupportedLayerError, first_line


class Custom(Op):
    name = "custom"
    reads_its_arguments = True

    @staticmethod
    def covers(node: fx.Node, module: nn.Module | None, rules: RuleSet, policy: LeafPolicy) -> bool:
        """Whether a user rule makes this node custom: planned before every other op."""
        if node.op == "call_module":
            return policy.is_user_leaf(module, node.target)
        if node.op == "call_function":
            return node.target in rules.functions
        return node.op == "call_method" and node.target in rules.methods

    def relevance(self, step, values, R, context: Context) -> Parents:
        parent = step.inputs[0]
        layer = step.module if step.module is not None else step.as_function_of_first_input(values)
        a, rule = values[parent], context.rule_for(step)
        try:
            R_in = rule.relevance(layer, a, R)
        except RuntimeError as error:  # R does not fit the first input (torch.stack, a reduction...)
            raise _misfit(step, rule, a, first_line(error)) from error
        if not isinstance(R_in, Tensor) or R_in.shape != a.shape:
            raise _misfit(step, rule, a, f"it returned {tuple(getattr(R_in, 'shape', ()))}")
        return [(parent, R_in)]


def _misfit(step, rule, a: Tensor, what: str) -> UnsupportedLayerError:
    """A user rule whose relevance cannot be the first input's: say so in one line."""
    extra = f"; the call combines {len(step.inputs)} input-dependent tensors and needs an op" \
        if len(step.inputs) > 1 else ""
    return UnsupportedLayerError(
        f"the rule {rule!r} for {describe(step.node, step.module)} gives no relevance of the shape of its "
        f"first input {tuple(a.shape)} ({what}){extra}"
    )
