"""The op registry: every node kind relprop knows, one module each, asked in order by the planner
(the first claim wins). Adding an op is one file and one `register_op(...)` line (see
docs/architecture.md, "Adding an op")."""

from __future__ import annotations

from torch import nn

from relprop.core.ops.add import Add
from relprop.core.ops.addcmul import AddCMul
from relprop.core.ops.assign import Assign
from relprop.core.ops.attention import Attention
from relprop.core.ops.base import Op, reproduces
from relprop.core.ops.cat import Cat
from relprop.core.ops.custom import Custom
from relprop.core.ops.graph_io import Constant, GraphInput, GraphOutput, Unsupported
from relprop.core.ops.linear import Linear
from relprop.core.ops.matmul import Matmul
from relprop.core.ops.maxpool import MaxPool
from relprop.core.ops.meta import Meta
from relprop.core.ops.passthrough import Passthrough
from relprop.core.ops.pool import Pool
from relprop.core.ops.recurrent import Recurrent
from relprop.core.ops.route import Route
from relprop.core.ops.scale import Scale
from relprop.core.ops.softmax import Softmax
from relprop.errors import ConfigError

OPS: list[Op] = [Linear(), MaxPool(), Passthrough(), Pool(), Route(), Attention(), Softmax(), Matmul(), Add(),
                 Cat(), Scale(), AddCMul(), Meta(), Assign(), Recurrent()]
# Kinds the planner assigns itself, not by claim: user-ruled nodes (before every claim), the
# graph's input and output, constants, and refusals.
CUSTOM, INPUT, OUTPUT, CONSTANT, UNSUPPORTED = Custom(), GraphInput(), GraphOutput(), Constant(), Unsupported()


def register_op(op: Op) -> Op:
    """Add a node kind; it is asked after the built-in ones (whose claims do not overlap)."""
    if any(existing.name == op.name for existing in all_ops()):
        raise ConfigError(f"an op named {op.name!r} is already registered")
    OPS.append(op)
    return op


def all_ops() -> list[Op]:
    return [*OPS, CUSTOM, INPUT, OUTPUT, CONSTANT, UNSUPPORTED]


def builtin_op(module: nn.Module) -> Op | None:
    """The op that reproduces this module's computation, if any (the first op whose `modules`
    hold one of its classes decides: a subclass with its own forward is no op's)."""
    for op in OPS:
        verdict = reproduces(module, op.modules)
        if verdict is not None:
            return op if verdict else None
    return None


def builtin_types() -> tuple[type[nn.Module], ...]:
    return tuple(t for op in OPS for t in op.modules)


def op_named(name: str) -> Op:
    return next(op for op in all_ops() if op.name == name)


__all__ = ["OPS", "Op", "register_op", "all_ops", "builtin_op", "builtin_types", "op_named"]
