"""Concatenation and stacking: each operand gets the slice of relevance of its elements; a constant
operand's slice (ViT's class token) follows the composite's constants policy. `torch.stack` is a
concatenation along a new dimension (each operand's slice is one index of it)."""

from __future__ import annotations

import torch
import torch.fx as fx

from relprop.core.ops.base import Context, KeepsSign, Op, Parents, positional
from relprop.core.trace import in_module

STACK = {torch.stack}


class Cat(KeepsSign, Op):
    name = "cat"
    reads_its_arguments = True
    functions = frozenset({torch.cat, torch.concat, *STACK})

    def relevance(self, step, values, R, context: Context) -> Parents:
        node = step.node
        tensors = node.args[0]
        dim = positional(node, 1, "dim", 0)
        if node.target in STACK:
            slices = list(R.unbind(dim))
        else:
            sizes = [values[t].shape[dim] if isinstance(t, fx.Node) else t.shape[dim] for t in tensors]
            slices = list(torch.split(R, sizes, dim=dim))
        pieces = [(t, piece, isinstance(t, fx.Node) and t in step.inputs)
                  for t, piece in zip(tensors, slices, strict=True)]
        where = f"'{node.name}'{in_module(node)}"
        if node.target not in STACK:
            return context.strategies.constants.at_cat(R, pieces, dim, where)
        # the policy sees the slices with their stacked dimension kept, as a concatenation's
        dim = dim % R.dim()
        kept = context.strategies.constants.at_cat(
            R, [(t, piece.unsqueeze(dim), dependent) for t, piece, dependent in pieces], dim, where)
        return [(t, piece.squeeze(dim)) for t, piece in kept]
