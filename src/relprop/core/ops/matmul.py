"""Products of two tensors (`@`, `torch.matmul`, `torch.bmm`, and `torch.einsum` of two operands,
as MaxViT writes them): attention's `QKᵀ` and `A·V`.

Two input-dependent factors take the uniform bilinear rule (half of the ε-rule's decomposition
to each, AttnLRP); one input-dependent factor takes the ε-rule. `A·V` whose `A` is attention
weights (a softmax the planner found) follows the composite's attention strategy."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from relprop.core.numerics import stabilize
from relprop.core.ops.base import Context, Op, Parents

FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm}
METHODS = {"matmul", "bmm"}
EPSILON = 1e-6  # LXT's stabilizer for the bilinear and linear ε-rules


@dataclass
class MatmulInfo:
    attention_weights: int | None = None  # the factor that is softmax attention weights (A in A·V, V·Aᵀ)


class Matmul(Op):
    name = "matmul"
    reads_its_arguments = True
    functions, methods = FUNCTIONS, METHODS

    def claim(self, node: fx.Node) -> bool:
        if node.target is torch.einsum:  # einsum("...", a, b): a bilinear product of two operands
            return len(node.args) == 3 and isinstance(node.args[0], str) and not node.kwargs
        return super().claim(node)

    @staticmethod
    def factors(node: fx.Node) -> tuple[Any, Any]:
        """The two factors of the product, as the call passes them."""
        return (node.args[1], node.args[2]) if node.target is torch.einsum else (node.args[0], node.args[1])

    def make_info(self) -> MatmulInfo:
        return MatmulInfo()

    def relevance(self, step, values, R, context: Context) -> Parents:
        first, second = self.factors(step.node)
        a, b = values[first], values[second]
        if step.node.target is torch.einsum:
            equation = step.node.args[0]
            product = lambda x, y: torch.einsum(equation, x, y)  # noqa: E731 - the product as a function
        else:
            product = torch.bmm if step.node.target in (torch.bmm, "bmm") else torch.matmul
        dependent = [arg in step.inputs for arg in (first, second)]
        weights = step.info.attention_weights
        if dependent == [True, True] and weights is not None:
            strategy = context.strategies.attention
            if weights == 0:
                R_a, R_b = strategy.weights_and_values(product, a, b, R)
            else:  # V·Aᵀ: the same rule with the factors' roles swapped
                R_b, R_a = strategy.weights_and_values(lambda w, v: product(v, w), b, a, R)
            return [(arg, R_arg) for arg, R_arg in ((first, R_a), (second, R_b)) if R_arg is not None]
        share = 0.5 if dependent == [True, True] else 1.0 if dependent[0] else 0.0
        R_a, R_b = bilinear_relevance(product, a, b, R, share_a=share)
        return [(arg, R_arg) for arg, R_arg, keep, part in ((first, R_a, dependent[0], share),
                                                            (second, R_b, dependent[1], 1 - share))
                if keep and part > 0]


def bilinear_relevance(fn: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor, R: Tensor,
                       share_a: float = 0.5, epsilon: float = EPSILON, output: Tensor | None = None
                       ) -> tuple[Tensor, Tensor]:
    """ε-LRP of a bilinear map z = fn(a, b): each contribution a_i b_j of z goes to its two
    factors, `share_a` of it to a and the rest to b (AttnLRP's uniform rule: 0.5). With
    `share_a=0` the map is linear in b (a held constant: the ε-rule on b). `output`: `fn(a, b)`
    as the forward pass computed it; with it, `a @ b` held at `a` is transposed directly (one
    product instead of two and no autograd graph: CP attention's A·V)."""
    if output is not None and share_a == 0 and fn is torch.matmul and a.dim() == b.dim() >= 2 \
            and a.shape[:-2] == b.shape[:-2]:
        s = R / stabilize(output.reshape(R.shape), epsilon)
        return torch.zeros_like(a), (a.transpose(-2, -1) @ s).mul_(b)
    with torch.enable_grad():
        a_ = a.detach().requires_grad_(share_a > 0)
        b_ = b.detach().requires_grad_(share_a < 1)
        z = fn(a_, b_)
        s = (R / stabilize(z.detach(), epsilon)).detach()
        wanted = [t for t in (a_, b_) if t.requires_grad]
        grads = torch.autograd.grad(z, wanted, s)
    grad = dict(zip([id(t) for t in wanted], grads, strict=True))
    R_a = share_a * a * grad[id(a_)] if share_a > 0 else torch.zeros_like(a)
    R_b = (1 - share_a) * b * grad[id(b_)] if share_a < 1 else torch.zeros_like(b)
    return R_a, R_b
