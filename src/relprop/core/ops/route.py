"""Nodes that move elements without combining them: reshapes, permutes, slicing, zero padding,
chunk/split, masking to 0 or −inf, and torchvision Swin's patch-merging pad. Relevance follows
the elements (the transpose of the routing); an element taken from a tuple (`x.chunk(2)[1]`)
sends its relevance to that slot of the tuple's relevance, and the chunk sends all slots back
at once."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from relprop.core.numerics import vjp
from relprop.core.ops.base import Context, KeepsSign, Op, Parents, positional

FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
             operator.getitem, torch.roll, torch.chunk, torch.split, torch.unbind, torch.tensor_split}
METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "t", "roll", "expand",
           "chunk", "split", "unbind", "tensor_split"}
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
            return positional(node, 2, "mode", "constant") == "constant" and not positional(node, 3, "value")
        return super().claim(node)

    def relevance(self, step, values, R, context: Context) -> Parents:
        parent = step.inputs[0]
        a = values[parent]
        if isinstance(a, (tuple, list)):
            slots: list[Tensor | None] = [torch.zeros_like(t) if isinstance(t, Tensor) else None for t in a]
            slots[step.node.args[1]] = R
            return [(parent, slots)]
        return [(parent, vjp(step.as_function_of_first_input(values), a, R))]


def _fill_value(node: fx.Node) -> Any:
    value = positional(node, 2, "value")
    return float(value) if isinstance(value, (int, float)) else None
