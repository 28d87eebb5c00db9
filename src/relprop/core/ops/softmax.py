"""Softmax inside attention: the attention strategy's rule for the scores. A softmax is attention
when every path from it (through routes, dropout, pass-throughs and linear maps such as the
talking-heads projections of CaiT and EfficientFormerV2) ends as one factor of a product with
another input-dependent tensor, `A·V` or `V·Aᵀ` (LeViT, SHViT): the product then knows its weights
operand, and the strategy holds it constant (CP) or splits it (AttnLRP). The weights may be mixed
on the way: scaled by a constant, summed with other terms, renormalized by their own sum (ConViT's
`(1 - σ(g))·softmax(QKᵀ) + σ(g)·softmax(pos)`, then `attn / attn.sum(-1)`): each such map is linear
in the weights for fixed constants and a held normalizer, so under CP nothing changes (the mixed
weights are held constant at the product) and under AttnLRP their relevance passes back in
proportion to the terms (the add's split), the normalizer held constant as LayerNorm's std (the
division's gate, scale.py), conserving up to the softmax rule itself. An elementwise product with
input-dependent values (EfficientViM's `softmax(dt + A) * B`) is such a product too: the softmax
is its gate. A softmax at the output is refused: LRP explains the scores before the softmax and
starts from the probability itself; any other softmax and log-softmax have no rule."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from relprop.core.ops.add import SUBTRACTIONS, Add
from relprop.core.ops.base import Context, Op, Parents, describe, positional, rule_key
from relprop.core.ops.graph_io import GraphOutput
from relprop.core.ops.linear import Linear
from relprop.core.ops.matmul import Matmul
from relprop.core.ops.passthrough import Passthrough
from relprop.core.ops.route import Route
from relprop.core.ops.scale import DIVISIONS, Scale
from relprop.errors import UnsupportedLayerError

ATTENTION_SOFTMAX = {F.softmax, torch.softmax, "softmax"}  # log_softmax is never attention
SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax}
SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmax2d)


class Softmax(Op):
    name = "softmax"
    reads_its_arguments = reads_its_output = True

    def claim(self, node: fx.Node) -> bool:
        if node.target in ATTENTION_SOFTMAX:
            return True
        if node.target in (SOFTMAX_FUNCTIONS if node.op == "call_function" else {"log_softmax"}):
            raise softmax_error(node, None)
        return False

    def claim_module(self, node: fx.Node, module: nn.Module) -> bool:
        if type(module) is nn.Softmax:
            return True
        if isinstance(module, SOFTMAX_MODULES):
            raise softmax_error(node, module)
        return False

    def annotate(self, step, plan) -> None:
        """A softmax is attention when every path from it ends as one factor of a product with
        another input-dependent tensor; that product then knows its weights operand. Any other
        softmax is refused."""
        products, reader = _attention_products(step.node, plan)
        if reader is not None:
            plan.refuse(step, softmax_error(step.node, step.module, reader))
            return
        for product, index in products:
            if isinstance(product.op, Scale):  # an elementwise product: the weights are its gate
                product.info.gate, product.info.unrelated = index, True
            else:
                product.info.attention_weights = index

    def relevance(self, step, values, R, context: Context) -> Parents:
        parent = step.inputs[0]
        return [(parent, context.strategies.attention.scores(values[parent], values[step.node], R, _dim(step)))]


def softmax_relevance(x: Tensor, s: Tensor, R: Tensor, dim: int) -> Tensor:
    """AttnLRP's softmax rule `R_x = x ⊙ (R − s ⊙ Σ_dim R)`; masked logits (−inf, where s = 0)
    get nothing."""
    R_x = x * (R - s * R.sum(dim, keepdim=True))
    return torch.where(torch.isfinite(x), R_x, torch.zeros_like(R_x))


def softmax_error(node: fx.Node, module: nn.Module | None, reader=None) -> UnsupportedLayerError:
    """The refusal: a softmax that reaches the output is explained by its logits; one inside the
    network that is not attention is named with what reads it."""
    what = describe(node, module)
    if reader is None:  # log-softmax and the softmax variants, refused when claimed
        return UnsupportedLayerError(
            f"relprop has no relevance rule for the softmax in {what}: at the model's output, remove it (LRP "
            f"starts from the probability itself: explain the logits); inside the network, give it one "
            f"(rules={{{rule_key(node, module)}: rule}})")
    if isinstance(reader.op, GraphOutput):
        return UnsupportedLayerError(
            f"the model applies softmax in {what} on the way to its output: LRP explains the scores "
            "before the softmax and starts from the probability itself; remove that softmax (explain the logits)")
    return UnsupportedLayerError(
        f"the softmax in {what} is read by {describe(reader.node, reader.module)}, not as attention weights "
        "(one factor of a product with input-dependent values); relprop has no rule for such a softmax: "
        f"give it one (rules={{{rule_key(node, module)}: rule}})")


# what attention weights may pass through on their way to A·V: routes, dropout and other
# pass-throughs (not normalizations), linear maps over heads (talking heads)
_ON_THE_WAY = (Route, Passthrough, Linear)


def _attention_products(node: fx.Node, plan) -> tuple[list, object | None]:
    """The products that read this softmax as attention weights, with the weights' operand
    index; or the first reader that is not on such a path."""
    found, todo, seen = [], [node], {node}
    while todo:
        current = todo.pop()
        readers = [plan.step_of[reader] for reader in plan.consumers.get(current, [])]
        normalizer, divisions = _renormalizations(current, readers, plan)
        for reader in readers:
            if reader.node in normalizer:  # computes the held normalizer of `current / Σ current`
                continue
            args = Matmul.factors(reader.node) if isinstance(reader.op, Matmul) else ()
            if isinstance(reader.op, Scale) and len(reader.inputs) == 2 and reader.node.target not in DIVISIONS:
                args = tuple(reader.node.args[:2])
            if args and (args[0] is current) != (args[1] is current):
                index = 0 if args[0] is current else 1
                if args[1 - index] in reader.inputs:  # the values depend on the input too
                    found.append((reader, index))
                    continue
                return [], reader
            if _on_the_way(reader, current) or reader.node in divisions:
                if reader.node not in seen:
                    seen.add(reader.node)
                    todo.append(reader.node)
                continue
            return [], reader
    return found, None


def _on_the_way(reader, current: fx.Node) -> bool:
    """A map linear in the weights for fixed constants: routes, dropout and other pass-throughs
    (not normalizations), linear maps over heads, a constant factor or divisor, a sum."""
    if isinstance(reader.op, Passthrough):
        return not Passthrough.normalizes(reader)
    if isinstance(reader.op, Scale):
        return len(reader.inputs) == 1 and (reader.node.target not in DIVISIONS or reader.node.args[0] is current)
    if isinstance(reader.op, Add):
        return reader.node.target not in SUBTRACTIONS or reader.node.args[0] is current
    return isinstance(reader.op, _ON_THE_WAY)


def _renormalizations(current: fx.Node, readers: list, plan) -> tuple[set, set]:
    """For renormalizations `current / d(current)` among the readers (the divisor computed from
    the dividend, held constant by the division, scale.py): the readers that only lead to d, and
    the divisions themselves."""
    normalizer, divisions = set(), set()
    for reader in readers:
        args = reader.node.args
        if (isinstance(reader.op, Scale) and reader.node.target in DIVISIONS and len(reader.inputs) == 2
                and args[0] is current and isinstance(args[1], fx.Node) and args[1] is not current):
            divisions.add(reader.node)
            normalizer.update(other.node for other in readers
                              if (other.node is args[1] or plan._is_ancestor(other.node, args[1]))
                              and _only_divides(other.node, args[1], plan))
    return normalizer, divisions


def _only_divides(node: fx.Node, divisor: fx.Node, plan) -> bool:
    """Whether every path from `node` leads to `divisor` and the divisor is read only as one
    (a normalizer also read elsewhere would carry the weights off the attention path)."""
    todo, seen = [node], {node}
    while todo:
        current = todo.pop()
        for consumer in plan.consumers.get(current, []):
            if current is divisor:
                if not (consumer.target in DIVISIONS and consumer.args[1] is divisor
                        and consumer.args[0] is not divisor):
                    return False
            elif consumer is not divisor and not plan._is_ancestor(consumer, divisor):
                return False
            if consumer not in seen:
                seen.add(consumer)
                if current is not divisor:
                    todo.append(consumer)
    return True


def _dim(step) -> int:
    dim = step.module.dim if step.module is not None else positional(step.node, 1, "dim")
    if not isinstance(dim, int):
        raise UnsupportedLayerError(f"softmax at '{step.node.name}' without an explicit integer dim is not supported")
    return dim
