"""A module, function or tensor method the user gave a rule (`rules={MyLayer: rule}`): the
node stays whole (a graph leaf for modules) and the rule maps its output relevance to its
first input."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from relprop.core.ops.base import Context, Op, Parents
from relprop.core.ruleset import RuleSet
from relprop.core.trace import LeafPolicy


class Custom(Op):
    name = "custom"

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
        return [(parent, context.rule_for(step).relevance(layer, values[parent], R))]
