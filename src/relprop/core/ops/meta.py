"""Shapes and sizes computed from the input (`x.size()`, `h // p`, timm's mask built from the
scores' shape): they carry no relevance."""

from __future__ import annotations

import operator

from torch import Tensor

from relprop.core.ops.base import Context, Op, Parents
from relprop.errors import UnsupportedLayerError

FUNCTIONS = {getattr, operator.floordiv, operator.sub, len}
METHODS = {"size", "dim", "numel"}
LIBRARY_FUNCTIONS = {"timm.layers.attention.resolve_self_attn_mask"}  # from the scores' shape and dtype only


class Meta(Op):
    name = "meta"
    functions, methods, library_functions = FUNCTIONS, METHODS, LIBRARY_FUNCTIONS

    def relevance(self, step, values, R, context: Context) -> Parents:
        if isinstance(values[step.node], Tensor):
            raise UnsupportedLayerError(f"no relevance rule for node '{step.node.name}' ({step.node.target})")
        return []
