"""Products with a constant or a gate: `x * c`, `x / c`, `x * gate(x)`, `x * x`, and gated products
of two input-dependent factors (gated MLPs, SwiGLU, StarNet's star operation, GhostNetV2's
attention, MambaOut).

- A constant factor or divisor takes no relevance: the product is linear in the other operand.
- `a / b` with an input-dependent divisor (a normalizer: EfficientViT's linear attention
  `out[..., :-1] / out[..., -1:]`, `x / x.norm()`, `g(x) / x`): the divisor is held constant and
  all relevance stays with the numerator, as LayerNorm's std (LXT; Ali et al. 2022) and
  `F.normalize`'s norm are; it conserves. It never goes to the divisor as if it were a signal.
- `x * g(x)`, a gate computed from the value it gates (SE blocks, SiLU written out): the gate
  gets none, all relevance stays with x (Arras et al. 2017's "signal-take-all").
- `x * x` (one input-dependent operand, twice): an elementwise square, the identity rule of an
  elementwise map (as `x ** 2`).
- `a * b` of two factors neither computed from the other: which one is the gate is read from the
  graph (the factor that leaves a squashing activation, sigmoid/hard sigmoid/tanh, over one that
  leaves another activation, over one that leaves none; dropout, reshapes and upsampling looked
  through, a chunk or slice only for a squashing activation), and
  the composite's attention strategy decides, as it does for attention weights:
  `ConservativeAttention` (the default) holds the gate constant and gives the signal all
  relevance (signal-take-all: Arras et al., "Explaining recurrent neural network predictions in
  sentiment analysis", WASSA 2017, for LSTM gates; the same choice as CP's constant attention
  weights, Ali et al. 2022; it conserves); `AttnLRP` takes the uniform rule, half of the ε-rule's
  decomposition to each factor (Achtibat et al., ICML 2024, Prop. 3.3; what LXT does in gated
  MLPs), so relevance also flows into the gate's branch. A product whose gate the graph cannot
  tell (both factors leave the same kind of activation, or none: FocalNet's `q * h(ctx)`, gMLP's
  `u * proj(v)`, CoaT's `q * conv(v)`, FocalNet's `ctx * gates`, SwiftFormer's `G * k`) takes the uniform rule under CP too:
  no choice of "the signal" is made where the graph gives none; it conserves.
  `ConservativeAttention(ambiguous="refuse")` refuses it instead.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from relprop.core.ops.base import Context, Op, Parents
from relprop.core.ops.passthrough import Passthrough
from relprop.core.ops.pool import Pool
from relprop.core.ops.route import Route
from relprop.core.trace import in_module
from relprop.errors import UnsupportedLayerError

FUNCTIONS = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul}
METHODS = {"mul", "mul_", "div", "div_"}
DIVISIONS = {operator.truediv, operator.itruediv, "div", "div_"}
SELECTIONS = {operator.getitem, torch.chunk, torch.split, torch.unbind, torch.tensor_split, "chunk", "split", "unbind",
              "tensor_split"}


@dataclass
class ScaleInfo:
    gate: int | None = None  # the operand that gates the other: it gets no relevance (signal-take-all)
    unrelated: bool = False  # two input-dependent factors, neither computed from the other


class Scale(Op):
    name = "scale"
    functions, methods = FUNCTIONS, METHODS

    def make_info(self) -> ScaleInfo:
        return ScaleInfo()

    def annotate(self, step, plan) -> None:
        if len(step.inputs) != 2 or step.info.gate is not None:  # one input-dependent operand (a constant
            return  # factor, or x * x), or attention weights (softmax.py set them as the gate)
        first, second = step.node.args[0], step.node.args[1]
        if step.node.target in DIVISIONS:  # a / b: b a normalizer, held constant (never the signal)
            step.info.gate = 1
            return
        source = plan.computed_from_the_other(step)
        if source is not None:
            step.info.gate = 1 - source
            return
        step.info.unrelated = True
        ranks = [_gating_rank(plan, arg) for arg in (first, second)]
        if ranks[0] != ranks[1]:
            step.info.gate = 0 if ranks[0] > ranks[1] else 1

    def relevance_parents(self, step) -> list[fx.Node]:
        if step.info.gate is not None:
            return [step.node.args[1 - step.info.gate]]
        return step.inputs

    def backward_reads(self, step, context: Context) -> list[fx.Node]:
        """A product of two input-dependent factors reads both; a scaling, only shapes."""
        return [*step.node.all_input_nodes] if step.info.unrelated else []

    def relevance(self, step, values, R, context: Context) -> Parents:
        node, info = step.node, step.info
        if info.unrelated:
            first, second = node.args[0], node.args[1]
            a, b = values[first], values[second]
            R_a, R_b = context.strategies.attention.gated_product(a, b, R, info.gate)
            if R_a is None and R_b is None:
                raise UnsupportedLayerError(
                    f"'{node.name}'{in_module(node)} multiplies two unrelated input-dependent tensors and relprop "
                    "cannot tell the gate from the signal (neither leaves a sigmoid or an activation the other does "
                    "not); use ConservativeAttention() (its default ambiguous='uniform') or attention='attnlrp' for the "
                    "uniform rule (half to each factor)")
            return [(arg, R_arg.sum_to_size(values[arg].shape)) for arg, R_arg in ((first, R_a), (second, R_b))
                    if R_arg is not None]
        parents = self.relevance_parents(step)
        if len(parents) != 1:
            raise UnsupportedLayerError(
                f"'{node.name}'{in_module(node)} combines {len(parents)} input-dependent operands in a way relprop has "
                "no rule for")
        return [(parents[0], R.sum_to_size(values[parents[0]].shape))]


def _gating_rank(plan, node: fx.Node) -> int:
    """How gate-like a factor is (see `Passthrough.gating_rank`), looking through reshapes,
    pooling and upsampling (GhostNetV2 upsamples its sigmoid gate), dropout and casts. Through a
    selection (`chunk`, `split`, indexing) only a squashing activation is seen: a half read
    directly from a split sigmoid is a gate (iFormer's `v, gate = sigmoid(·).chunk(2)`, gating
    the attention over v); another activation before a split (gMLP's GELU before its spatial
    gating unit) belongs to both halves, not to one factor."""
    while True:
        step = plan.step_of[node]
        if step.node.target in SELECTIONS and step.inputs:
            return 2 if _gating_rank(plan, step.inputs[0]) == 2 else 0
        if isinstance(step.op, Passthrough):
            rank = Passthrough.gating_rank(step)
            if rank is not None:
                return rank
        elif not isinstance(step.op, (Route, Pool)) or not step.inputs or step.node.target in SELECTIONS:
            return 0
        node = step.inputs[0]
