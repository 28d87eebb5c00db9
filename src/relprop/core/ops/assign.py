"""Item assignment into an activation (`x[:, :, i:, j:] = v`, MViTv2's relative-position scores), as
the capture path records it: `assign(x, index, v)`, an out-of-place copy of x with the indexed
elements replaced by v. It only moves elements, so relevance follows them (the transpose of the
routing): the replaced region's relevance goes to v (summed over v's broadcast), the rest to x."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from relprop.core.numerics import vjp
from relprop.core.ops.base import Context, KeepsSign, Op, Parents


def assign(x: Tensor, index: Any, value: Any) -> Tensor:
    """`x[index] = value` without changing x (the graph keeps every activation)."""
    out = x.clone()
    out[index] = value
    return out


class Assign(KeepsSign, Op):
    name = "assign"
    reads_its_arguments = True
    functions = {assign}

    def relevance(self, step, values, R, context: Context) -> Parents:
        x_node, index, v_node = step.node.args
        x, v = step.operand(x_node, values), step.operand(v_node, values)
        parents = []
        if x_node in step.inputs:
            parents.append((x_node, vjp(lambda t: assign(t, index, v), x, R)))
        if v_node in step.inputs:
            parents.append((v_node, vjp(lambda t: assign(torch.zeros_like(x), index, t), v, R)))
        return parents
