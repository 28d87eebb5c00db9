"""Nodes that move elements without combining them: reshapes, permutes, slicing, zero padding,
chunk/split, masking to 0 or −inf, and torchvision Swin's patch-merging pad. Relevance follows
the elements (the transpose of the routing); an element taken from a tuple (`x.chunk(2)[1]`)
sends its relevance to that slot of the tuple's relevance, and the chunk sends all slots back
at once.

Routes that copy elements (`expand`, `repeat`, `repeat_interleave`, reflect/replicate/circular
padding) send each copy's relevance back to its source, where the copies' relevance adds up: the
transpose of a copy is a sum, so the total is kept (the z-rule of a map whose weights are 0 or 1).
`reshape_as(other)` and `expand_as(other)` read only `other`'s shape: it gets no relevance."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from relprop.core.numerics import vjp
from relprop.core.ops.base import Context, KeepsSign, Op, Parents, positional
from relprop.core.trace import in_module
from relprop.errors import UnsupportedLayerError

FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
             operator.getitem, torch.roll, torch.chunk, torch.split, torch.unbind, torch.tensor_split,
             torch.repeat_interleave, torch.flip, torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis}
METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "t", "roll", "expand",
           "chunk", "split", "unbind", "tensor_split", "reshape_as", "view_as", "expand_as", "repeat",
           "repeat_interleave", "flip", "swapaxes", "swapdims", "movedim", "moveaxis"}
# the pad modes that copy elements of the input (every output element is one input element)
COPYING_PADS = {"reflect", "replicate", "circular"}
# torchvision's Swin patch merging (pad, four strided slices, cat), by importable name
LIBRARY_FUNCTIONS = {"torchvision.models.swin_transformer._patch_merging_pad"}


class Route(KeepsSign, Op):
    name = "route"
    modules = (nn.Flatten, nn.Unflatten)
    keeps_the_input_layer = True
    functions, methods, library_functions = FUNCTIONS, METHODS, LIBRARY_FUNCTIONS

    def claim(self, node: fx.Node) -> bool:
        # masking scores (−inf) or zeroing: the filled elements take nothing; another fill value
        # would drop that relevance silently
        if node.op == "call_method" and node.target == "masked_fill":
            return _fill_value(node) in (0.0, float("-inf"))
        if node.target is F.pad:  # zero padding: relevance follows the elements it keeps
            mode = positional(node, 2, "mode", "constant")
            return mode in COPYING_PADS or (mode == "constant" and not positional(node, 3, "value"))
        return super().claim(node)

    def relevance(self, step, values, R, context: Context) -> Parents:
        parent = first_operand(step)
        a = values[parent]
        if isinstance(a, (tuple, list)):
            slots: list[Tensor | None] = [torch.zeros_like(t) if isinstance(t, Tensor) else None for t in a]
            slots[step.node.args[1]] = R
            return [(parent, slots)]
        return [(parent, vjp(step.as_function_of_first_input(values), a, R))]


def first_operand(step) -> fx.Node:
    """The routed tensor: the call's first argument. `c.expand_as(x)` of a constant `c` depends
    on the input only through x's shape; relevance reaching it would have nowhere to go."""
    first = step.node.args[0] if step.node.args else step.inputs[0]
    if first not in step.inputs:
        raise UnsupportedLayerError(f"'{step.node.name}'{in_module(step.node)} routes a constant shaped like an "
                                    "input-dependent tensor; relprop has no rule for relevance that reaches it")
    return first


def _fill_value(node: fx.Node) -> Any:
    value = positional(node, 2, "value")
    return float(value) if isinstance(value, (int, float)) else None
