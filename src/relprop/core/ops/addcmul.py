"""`torch.addcmul(input, t1, t2, value=v)` = input + v·t1·t2: timm's affine layers (ResMLP's
`addcmul(β, α, x)`) and ConvNeXt-V2's Global Response Normalization (`x + addcmul(β, γ, x·N(x))`,
with N(x) = ‖x‖ / mean ‖x‖ computed from x).

The call is an add of `input` and a product, and takes the two rules it is made of: the add's
(the split strategy when both sides depend on the input, the constants policy when one side is a
constant such as β), then the product's (scale.py: all relevance to its one input-dependent
factor, a constant such as γ or v taking none). For GRN this treats the response N(x) as a
constant, the way LXT holds LayerNorm's std constant (Achtibat et al., ICML 2024): the block is
then linear in x and conserves. A product of two input-dependent factors is refused."""

from __future__ import annotations

import torch
import torch.fx as fx

from relprop.core.ops.base import Context, Op, Parents, positional
from relprop.core.trace import in_module
from relprop.errors import UnsupportedLayerError


class AddCMul(Op):
    name = "addcmul"
    reads_its_arguments = True
    functions, methods = frozenset({torch.addcmul}), frozenset({"addcmul"})

    def relevance(self, step, values, R, context: Context) -> Parents:
        node, strategies = step.node, context.strategies
        operands = [node.args[0], positional(node, 1, "tensor1"), positional(node, 2, "tensor2")]
        dependent = [isinstance(arg, fx.Node) and arg in step.inputs for arg in operands]
        base, t1, t2 = (step.operand(arg, values) for arg in operands)
        product = float(node.kwargs.get("value", 1)) * t1 * t2
        if dependent[1] and dependent[2]:
            raise UnsupportedLayerError(f"'{node.name}'{in_module(node)} multiplies two input-dependent tensors "
                                        "inside addcmul; relprop has no rule for that")
        if dependent[0] and (dependent[1] or dependent[2]):
            R_base, R_product = strategies.split(R, *torch.broadcast_tensors(base, product), None)
        elif dependent[0]:
            R_base, R_product = strategies.constants.at_add(R, base, product, 0, strategies.split), None
        else:
            R_base, R_product = None, strategies.constants.at_add(R, base, product, 1, strategies.split)
        parents = []
        if R_base is not None:
            parents.append((operands[0], R_base.sum_to_size(base.shape)))
        if R_product is not None:
            factor = 1 if dependent[1] else 2
            parents.append((operands[factor], R_product.sum_to_size(values[operands[factor]].shape)))
        return parents
