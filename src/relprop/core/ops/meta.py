"""Shapes and sizes read from the input (`x.shape`, `x.size()`, `len(x)`, timm's mask built from
the scores' shape): they carry no relevance, and neither does arithmetic on them (`h // p`), which
the planner recognizes by its operands alone.

Only reads that cannot return the tensor's values are claimed: a tensor-valued attribute (`x.T`,
`x.real`) or tensor arithmetic (`pool(x) - x`) taken for a shape would cut its branch from the
relevance while the conservation report stayed clean."""

from __future__ import annotations

import torch.fx as fx
from torch import Tensor

from relprop.core.ops.base import Context, Op, Parents, positional
from relprop.errors import UnsupportedLayerError

FUNCTIONS = {getattr, len}
METHODS = {"size", "dim", "numel"}
LIBRARY_FUNCTIONS = {"timm.layers.attention.resolve_self_attn_mask"}  # from the scores' shape and dtype only
# attributes of a tensor that describe it without its values
METADATA_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"}


class Meta(Op):
    name = "meta"
    functions, methods, library_functions = FUNCTIONS, METHODS, LIBRARY_FUNCTIONS

    def claim(self, node: fx.Node) -> bool:
        if node.target is getattr:
            return positional(node, 1, "name") in METADATA_ATTRIBUTES
        return super().claim(node)

    def backward_reads(self, step, context: Context) -> list[fx.Node]:
        """Nothing's numbers: its own value is only type-checked (and kept: held constant)."""
        return []

    def relevance(self, step, values, R, context: Context) -> Parents:
        if isinstance(values[step.node], Tensor):
            raise UnsupportedLayerError(f"no relevance rule for node '{step.node.name}' ({step.node.target})")
        return []
