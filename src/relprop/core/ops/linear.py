"""Linear, ConvNd, ConvTransposeNd (modules or `F.linear`/`F.convNd` calls): the layer's rule
on its effective linear map, with any BatchNorm the canonizer folded into it.

A conv that reads an explicit zero pad (timm's `Conv2dSame`, `StdConv2dSame`, TF-'same' models)
takes its rule on the composed map conv∘pad, a function of the unpadded tensor, as a conv's own
padding is: the input rules that weigh inputs regardless of their values (W⁺, flat, zB's bounds)
would otherwise give the padded zeros a share, which the pad then drops (4 % of the total on
vit_tiny_r_s16_p8_224), and so would z+'s fallback inside the network, where a window of zeros
after a ReLU sends its relevance by w⁺ (2 % on pnasnet5large's 'same' separable convs)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from relprop.core.linear_op import (
    LINEAR_FUNCTIONS,
    LINEAR_TYPES,
    LinearOp,
    as_linear_op,
    fold_batchnorm,
    functional_linear_op,
    module_forward,
)
from relprop.core.numerics import FOLDED_WEIGHT, scratch_like
from relprop.core.ops.base import Context, Op, Parents
from relprop.core.ops.passthrough import batchnorm_stats
from relprop.core.ops.route import constant_pad
from relprop.core.rules import Rule


@dataclass
class LinearInfo:
    is_input_layer: bool = False  # consumes the image (possibly through reshapes or pass-throughs)
    fold_after: fx.Node | None = None  # the BatchNorm right after it, folded into its rule
    fold_before: fx.Node | None = None  # the BatchNorm right before it, folded likewise
    feeds_attention: bool = False  # its output reaches an attention call through routing alone (fused qkv)


class Linear(Op):
    name = "linear"
    modules = LINEAR_TYPES
    functions = LINEAR_FUNCTIONS.keys()

    def make_info(self) -> LinearInfo:
        return LinearInfo()

    def output_is_fresh(self, step) -> bool:
        return True  # a product's result (the bias added in place to it)

    def forward(self, step, args: tuple, kwargs: dict, model: nn.Module) -> Any:
        if step.module is not None:
            return module_forward(step.module, args, kwargs)
        return super().forward(step, args, kwargs, model)

    def backward_reads(self, step, context: Context) -> list[fx.Node]:
        """Its arguments, and theirs (the values before a BatchNorm folded in before it or an
        explicit zero pad), a BatchNorm call's arguments folded after it, and its own output
        where the rule takes the denominator from it (`Rule.relevance_from_output`)."""
        info: LinearInfo = step.info
        reads = [*step.node.all_input_nodes]
        for node in (info.fold_before, info.fold_after, step.inputs[0] if info.is_input_layer else None):
            if node is not None:  # (a BatchNorm after it reads this layer's output for its shape only)
                reads += [n for n in node.all_input_nodes if n is not step.node]
        if step.inputs and context.step_of[step.inputs[0]].op.name == "route":  # a zero pad read through
            reads += step.inputs[0].all_input_nodes
        rule = type(context.rule_for(step))
        recorded = _recorded_map(step)
        if recorded is not None and rule.relevance_from_output is not Rule.relevance_from_output:
            reads.append(recorded)
        return reads

    def sees_the_input(self, step) -> bool:
        return step.info.is_input_layer

    def default_rule(self, step, strategies):
        return strategies.default_input_rule if step.info.is_input_layer else strategies.default_rule

    def annotate(self, step, plan) -> None:
        current = step.inputs[0]
        while plan.step_of[current].op.keeps_the_input_layer and plan.step_of[current].inputs:
            current = plan.step_of[current].inputs[0]
        step.info.is_input_layer = plan.step_of[current].is_input
        step.info.feeds_attention = _feeds_attention(step.node, plan.step_of)

    def relevance(self, step, values, R, context: Context) -> Parents:
        """With a BatchNorm folded in before the layer, the op reads the BatchNorm's input, and
        the relevance passes through the BatchNorm unchanged."""
        rule = context.rule_for(step)
        folded = step.info.fold_before
        source = step.inputs[0] if folded is None else context.step_of[folded].inputs[0]  # the BatchNorm's input
        op = self.effective_op(step, values, context)
        target = step.inputs[0]
        padded = _zero_pad_before(step, op, values, context) if folded is None else None
        if padded is not None:
            target, pads = padded
            source = target
            op = PaddedLinearOp(**{f.name: getattr(op, f.name) for f in fields(op)}, pre_pad=pads)
        live = _live_outputs(op, R) if step.info.feeds_attention else None
        if live is not None:  # the outputs that carry relevance: the rule runs on their rows alone
            op, R = _narrowed(op, live), R[..., live]
        if rule.wants_nonnegative and context.step_of[source].nonnegative:
            return [(target, rule.relevance(op, values[source], R, nonnegative=True))]
        recorded = _recorded_map(step) if padded is None else None
        if recorded is not None:
            output = values[recorded] if live is None else values[recorded][..., live]
            return [(target, rule.relevance_from_output(op, values[source], R, output))]
        return [(target, rule.relevance(op, values[source], R))]

    @staticmethod
    def effective_op(step, values, context: Context) -> LinearOp:
        """The step's linear map with its adjacent BatchNorms folded in; cached per parameter
        version for modules. A folded map is a copy of the weights: cached only where the engine
        is asked to (`cache_weights`; a copy of every conv for the explainer's life, 97 MiB on
        ResNet-50), else folded per call (a product over the weights)."""
        info: LinearInfo = step.info
        bns = [context.step_of[n] for n in (info.fold_before, info.fold_after) if n is not None]
        # Cacheable: everything comes from modules' tensors (a functional call's weight is computed
        # in the forward pass) and nothing from the input's shape (folding before a padded conv).
        cacheable = step.module is not None and info.fold_before is None and all(bn.module is not None for bn in bns)
        cacheable = cacheable and (not bns or getattr(context, "cache_weights", False))
        key = None
        if cacheable:
            sources = [step.module, *(bn.module for bn in bns)]
            key = tuple((t._version, t.data_ptr(), t.device) for m in sources for t in (*m.parameters(), *m.buffers()))
            cached = context.cache.get(step.node)
            if cached is not None and cached[0] == key:
                return cached[1]
        if step.module is not None:
            op = as_linear_op(step.module)
        else:
            args, kwargs = step.arguments(values)
            op = functional_linear_op(step.node.target, args, kwargs)
        if info.fold_before is not None:
            bn = context.step_of[info.fold_before]
            op = fold_batchnorm(op, batchnorm_stats(bn, values), before=True, input_shape=values[bn.node].shape)
        if info.fold_after is not None:  # W' dies with the call unless cached: then in the walk's scratch
            out = scratch_like(op.weight, FOLDED_WEIGHT) if key is None else None
            op = fold_batchnorm(op, batchnorm_stats(context.step_of[info.fold_after], values), out=out)
        if key is not None:
            context.cache[step.node] = (key, op)
        return op


def _feeds_attention(node: fx.Node, step_of: dict) -> bool:
    """Whether a layer's output reaches an attention call through element routing and
    pass-throughs alone (timm's fused qkv projection, unbound into q, k and v)."""
    frontier, seen = [node], {node}
    while frontier:
        for user in frontier.pop().users:
            name = step_of[user].op.name if user in step_of else None
            if name == "attention":
                return True
            if name in ("route", "passthrough") and user not in seen:
                seen.add(user)
                frontier.append(user)
    return False


def _live_outputs(op: LinearOp, R: Tensor) -> slice | None:
    """The one contiguous range of a dense layer's outputs outside which R is exactly zero,
    where there is such a range short of all of them (None otherwise): a fused qkv projection
    under CP, whose query and key thirds receive nothing. Every linear rule sends each output's
    relevance through that output's row of W alone, so the rows outside give exact zeros. Only
    asked of layers that feed attention: elsewhere (a class seed at the head) a narrower GEMM
    rounds differently in the last bit and saves nothing."""
    if op.kind != "linear" or op.bias is not None and op.bias.dim() != 1 or R.dim() < 1:
        return None
    live = R.reshape(-1, R.shape[-1]).any(0).nonzero()
    if len(live) == 0:
        return None
    first, last = int(live[0]), int(live[-1]) + 1
    if first == 0 and last == R.shape[-1]:
        return None
    return slice(first, last)


def _narrowed(op: LinearOp, rows: slice) -> LinearOp:
    """The linear map restricted to some of its outputs."""
    return LinearOp(op.weight[rows], None if op.bias is None else op.bias[rows])


def _recorded_map(step) -> fx.Node | None:
    """The node whose recorded value is this step's effective map `op.forward(a, W, b)`: its
    own output, bit for bit, for a module computed by `module_forward`; the output of a BatchNorm
    folded in after it (`BN(conv(a))`, the folded map `W'a + b'` to float rounding: the ε rule's
    denominator need not be recomputed by a second product). None where nothing recorded is."""
    info: LinearInfo = step.info
    if info.fold_before is not None:
        return None
    if info.fold_after is not None:
        return info.fold_after
    return step.node if step.module is not None else None


@dataclass(frozen=True, eq=False)
class PaddedLinearOp(LinearOp):
    """A convolution of a zero-padded input, as a map of the unpadded input (`pre_pad`: F.pad's
    amounts, last dimension first)."""

    pre_pad: tuple[int, ...] = ()

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return super().forward(F.pad(x, self.pre_pad), weight, bias)

    def transpose(self, s: Tensor, weight: Tensor, input_shape: torch.Size) -> Tensor:
        shape = list(input_shape)
        for i in range(len(self.pre_pad) // 2):
            shape[-1 - i] += self.pre_pad[2 * i] + self.pre_pad[2 * i + 1]
        return F.pad(super().transpose(s, weight, torch.Size(shape)), [-p for p in self.pre_pad])


def _zero_pad_before(step, op: LinearOp, values, context: Context) -> tuple[fx.Node, tuple[int, ...]] | None:
    """The explicit zero pad a conv reads: (its input, its amounts), or None."""
    if op.kind != "conv":
        return None
    pad = context.step_of[step.inputs[0]]
    if pad.op.name != "route" or len(pad.inputs) != 1:
        return None
    found = constant_pad(pad, values)
    if found is None:
        return None
    amounts, value = found
    if (value or 0.0) != 0.0 or any(a < 0 for a in amounts) or len(amounts) > 2 * op.dims:
        return None
    return pad.inputs[0], amounts
