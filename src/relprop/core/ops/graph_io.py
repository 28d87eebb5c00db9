"""The nodes that only start or end relevance: the model's input, its output, and constants
(parameters read with `get_attr`, values that do not depend on the input)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from relprop.core.ops.base import Context, Op, Parents
from relprop.core.ops.passthrough import DROPOUT_FUNCTIONS
from relprop.core.trace import eval_mode, unshared_input


class GraphInput(Op):
    name = "input"
    carries_relevance = False  # the walk keeps what arrives here: the explanation


class GraphOutput(Op):
    name = "output"
    carries_relevance = False


class Constant(Op):
    """Input-independent values: computed in the forward pass, relevance that reaches them is
    dropped (the constants policy decides whether any does)."""

    name = "constant"
    carries_relevance = False

    def forward(self, step, args: tuple, kwargs: dict, model: nn.Module) -> Any:
        node = step.node
        if node.op == "placeholder":  # an optional argument (timm's attn_mask=None): its default
            return node.args[0]
        if node.op == "get_attr":
            value: Any = model
            for part in node.target.split("."):
                value = getattr(value, part)
            return value.float() if isinstance(value, Tensor) and value.is_floating_point() else value
        if node.op == "call_function" and node.target in DROPOUT_FUNCTIONS:
            return args[0]
        if node.op == "call_module":
            with eval_mode(step.module):
                return step.module(*unshared_input(step.module, args), **kwargs)
        return super().forward(step, args, kwargs, model)

    def relevance(self, step, values, R, context: Context) -> Parents:
        return []


class Unsupported(Op):
    """A node no op can take; its error is raised if relevance ever reaches it."""

    name = "unsupported"
    reads_its_arguments = True

    def relevance(self, step, values, R, context: Context) -> Parents:
        raise step.info

