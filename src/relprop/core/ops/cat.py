"""Concatenation: each operand gets the slice of relevance of its elements; a constant operand's
slice (ViT's class token) follows the composite's constants policy."""

from __future__ import annotations

import torch
import torch.fx as fx

from relprop.core.ops.base import Context, KeepsSign, Op, Parents, positional
from relprop.core.trace import in_module


class Cat(KeepsSign, Op):
    name = "cat"
    functions = frozenset({torch.cat, torch.concat})

    def relevance(self, step, values, R, context: Context) -> Parents:
        node = step.node
        tensors = node.args[0]
        dim = positional(node, 1, "dim", 0)
        sizes = [values[t].shape[dim] if isinstance(t, fx.Node) else t.shape[dim] for t in tensors]
        pieces = [(t, piece, isinstance(t, fx.Node) and t in step.inputs)
                  for t, piece in zip(tensors, torch.split(R, sizes, dim=dim), strict=True)]
        return context.strategies.constants.at_cat(R, pieces, dim, f"'{node.name}'{in_module(node)}")
