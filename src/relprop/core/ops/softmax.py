"""Softmax inside attention (its output feeds `A·V`): the attention strategy's rule for the
scores. Any other softmax (probabilities at the output, log-softmax) is refused: LRP explains the
scores before the softmax and starts from the probability itself."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from relprop.core.ops.base import Context, Op, Parents, describe, positional
from relprop.core.ops.matmul import Matmul
from relprop.core.ops.passthrough import Passthrough
from relprop.errors import UnsupportedLayerError

ATTENTION_SOFTMAX = {F.softmax, torch.softmax, "softmax"}  # log_softmax is never attention
SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax}
SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmax2d)


class Softmax(Op):
    name = "softmax"

    def claim(self, node: fx.Node) -> bool:
        if node.target in ATTENTION_SOFTMAX:
            return True
        if node.target in (SOFTMAX_FUNCTIONS if node.op == "call_function" else {"log_softmax"}):
            raise softmax_error(describe(node, None))
        return False

    def claim_module(self, node: fx.Node, module: nn.Module) -> bool:
        if type(module) is nn.Softmax:
            return True
        if isinstance(module, SOFTMAX_MODULES):
            raise softmax_error(describe(node, module))
        return False

    def annotate(self, step, plan) -> None:
        """A softmax is attention when everything that reads it (through dropout and other
        pass-throughs) is the first factor of a product `A @ V`; that product then knows its
        weights operand. Any other softmax is refused."""
        products = _attention_products(step.node, plan)
        if products is None:
            plan.refuse(step, softmax_error(describe(step.node, step.module)))
            return
        for product in products:
            product.info.attention_weights = True

    def relevance(self, step, values, R, context: Context) -> Parents:
        parent = step.inputs[0]
        return [(parent, context.strategies.attention.scores(values[parent], values[step.node], R, _dim(step)))]


def softmax_relevance(x: Tensor, s: Tensor, R: Tensor, dim: int) -> Tensor:
    """AttnLRP's softmax rule `R_x = x ⊙ (R − s ⊙ Σ_dim R)`; masked logits (−inf, where s = 0)
    get nothing."""
    R_x = x * (R - s * R.sum(dim, keepdim=True))
    return torch.where(torch.isfinite(x), R_x, torch.zeros_like(R_x))


def softmax_error(what: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"the model applies softmax in {what}: LRP explains the scores before the softmax and "
        "starts from the probability itself; remove the softmax from the model (explain the "
        "logits), or give it a rule if it sits inside the network"
    )


def _attention_products(node: fx.Node, plan) -> list | None:
    found, todo = [], [node]
    while todo:
        current = todo.pop()
        readers = [plan.step_of[reader] for reader in plan.consumers.get(current, [])]
        if not readers:
            return None
        for reader in readers:
            if isinstance(reader.op, Passthrough) and not Passthrough.normalizes(reader):
                todo.append(reader.node)
            elif isinstance(reader.op, Matmul) and reader.node.args[0] is current and reader.node.args[1] is not current:
                found.append(reader)
            else:
                return None
    return found


def _dim(step) -> int:
    dim = step.module.dim if step.module is not None else positional(step.node, 1, "dim")
    if not isinstance(dim, int):
        raise UnsupportedLayerError(f"softmax at '{step.node.name}' without an explicit integer dim is not supported")
    return dim
