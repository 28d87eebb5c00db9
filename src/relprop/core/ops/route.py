"""Nodes that move elements without combining them: reshapes, permutes, slicing, zero padding,
chunk/split, masking to 0 or −inf, and torchvision Swin's patch-merging pad. Relevance follows
the elements (the transpose of the routing); an element taken from a tuple (`x.chunk(2)[1]`)
sends its relevance to that slot of the tuple's relevance, and the chunk sends all slots back
at once.

Routes that copy elements (`expand`, `repeat`, `repeat_interleave`, reflect/replicate/circular
padding, `nn.Unfold`/`F.unfold` and `Tensor.unfold`'s sliding windows) send each copy's relevance
back to its source, where the copies' relevance adds up: the transpose of a copy is a sum, so the
total is kept (the z-rule of a map whose weights are 0 or 1).

Constant padding (`F.pad` in mode "constant", `nn.ZeroPadNd`, `nn.ConstantPadNd`) keeps each
input element once and adds constants: it is a concatenation with constant blocks, so relevance
follows the kept elements and what reaches a padded position goes where the composite's constants
policy sends a concatenated constant's (constants.py): `KeepOnInput` (the default) rescales the
kept elements' relevance so the total is kept, `LeakToConstants` drops it, as a bias's share. It
reaches padded positions where the layer after the pad sees no contribution there and falls back
(z+ on the zeros of SAM's and Hiera's padded attention windows, whose padded tokens' values are
the qkv bias alone: 12-18 % of the total at 64 px), or where the pad value is not zero
(EfficientViT's column of ones, the normalizer of its linear attention). Where nothing reaches
them (a zero pad under the ε- or z-rule) the relevance is the plain crop, to the bit. A −inf pad
(timm's MaxPool2dSame, NASNet's 'same' pools) feeds a max pool, which gives −inf elements no
relevance (maxpool.py); NaN or +inf is refused.
`reshape_as(other)` and `expand_as(other)` read only `other`'s shape: it gets no relevance."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from relprop.core.numerics import vjp
from relprop.core.ops.base import Context, KeepsSign, Op, Parents, positional
from relprop.core.trace import in_module
from relprop.errors import UnsupportedLayerError

FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
             operator.getitem, torch.roll, torch.chunk, torch.split, torch.unbind, torch.tensor_split,
             torch.repeat_interleave, torch.flip, torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis,
             F.unfold}
METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "t", "roll", "expand",
           "chunk", "split", "unbind", "tensor_split", "reshape_as", "view_as", "expand_as", "repeat",
           "repeat_interleave", "flip", "swapaxes", "swapdims", "movedim", "moveaxis", "unfold"}
# the pad modes that copy elements of the input (every output element is one input element)
COPYING_PADS = {"reflect", "replicate", "circular"}
# padding and sliding-window modules: each output element is one input element or a constant
PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
               nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
               nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
# the pads that add constant elements (a concatenation with constants: the constants policy applies)
CONSTANT_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
                        nn.ConstantPad3d)
# fields of the (values, indices) tuples of `x.max(dim)`, `x.topk(k)`, `x.sort()`, by slot
TUPLE_FIELDS = {"values": 0, "indices": 1}
# torchvision's Swin patch merging (pad, four strided slices, cat), by importable name
LIBRARY_FUNCTIONS = {"torchvision.models.swin_transformer._patch_merging_pad"}


class Route(KeepsSign, Op):
    name = "route"
    modules = (nn.Flatten, nn.Unflatten, nn.Unfold, *PAD_MODULES)
    keeps_the_input_layer = True
    functions, methods, library_functions = FUNCTIONS, METHODS, LIBRARY_FUNCTIONS

    def claim(self, node: fx.Node) -> bool:
        # masking scores (−inf) or zeroing: the filled elements take nothing; another fill value
        # would drop that relevance silently
        if node.op == "call_method" and node.target == "masked_fill":
            return _fill_value(node) in (0.0, float("-inf"))
        if node.op == "call_function" and node.target is getattr:  # `x.max(1).values`
            return node.args[1] in TUPLE_FIELDS
        if node.target is F.pad:  # relevance follows the elements it keeps or copies
            mode = positional(node, 2, "mode", "constant")
            value = positional(node, 3, "value")
            # a number (a tensor-valued one could depend on the input): finite, or −inf (a max's
            # neutral element: the max pool gives such elements no relevance)
            return mode in COPYING_PADS or (mode == "constant" and (value is None or _padding_value(value)))
        return super().claim(node)

    def check_module(self, node: fx.Node, module: nn.Module) -> None:
        value = getattr(module, "value", 0.0)
        if isinstance(module, PAD_MODULES) and not _padding_value(value):
            raise UnsupportedLayerError(f"module '{node.target}' ({type(module).__name__}) pads with {value}, "
                                        "a constant no rule can weigh (finite or −inf only); give it a rule "
                                        f"(rules={{torch.nn.{type(module).__name__}: rule}})")

    def backward_reads(self, step, context: Context) -> list[fx.Node]:
        """Not the routed tensor's numbers (the transpose of a routing does not depend on them),
        only the other arguments (indices, masks)."""
        routed = step.node.args[0] if step.node.args else None
        return [node for node in step.node.all_input_nodes if node is not routed]

    def relevance(self, step, values, R, context: Context) -> Parents:
        parent = first_operand(step)
        a = values[parent]
        if isinstance(a, (tuple, list)):
            slots: list[Tensor | None] = [torch.zeros_like(t) if isinstance(t, Tensor) else None for t in a]
            field = step.node.args[1]
            slots[TUPLE_FIELDS[field] if step.node.target is getattr else field] = R
            return [(parent, slots)]
        moved = _moved_back(step, a.shape, R, values)
        if moved is not None:
            return [(parent, moved)]
        if a.device.type == "meta":  # released after the forward pass: its shape is all the transpose needs
            device = next(r for r in R if r is not None).device if isinstance(R, list) else R.device
            a = torch.zeros(a.shape, dtype=a.dtype, device=device)
        function = step.as_function_of_first_input(values)
        R_in = vjp(function, a, R)
        pad = constant_pad(step, values)
        padded = None if pad is None else _padded_positions(function, a)
        if padded is None or not bool(R.masked_select(padded).any()):
            return [(parent, R_in)]
        pieces = [(parent, R_in, True), (None, R.masked_fill(~padded, 0.0), False)]
        amounts = pad[0]
        dim = min(R.dim() - 1 - i for i in range(len(amounts) // 2) if amounts[2 * i] or amounts[2 * i + 1])
        return context.strategies.constants.at_cat(R, pieces, dim, f"'{step.node.name}'{in_module(step.node)}")


# Routes whose transpose is a reshape back to the input's shape (element order kept), and those
# whose transpose is the inverse permutation: computed directly, the tensor autograd's vjp would
# give (the same view, the same numbers), without building a graph per node or materializing a
# released input (ConvNeXt-T's 48 permutes: 5 ms of a 130 ms walk).
_RESHAPES = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, "view", "reshape", "flatten", "squeeze",
             "unsqueeze", "view_as", "reshape_as", nn.Flatten, nn.Unflatten}
_PERMUTES = {torch.permute, "permute"}
_SWAPS = {torch.transpose, torch.swapaxes, torch.swapdims, "transpose", "swapaxes", "swapdims"}


def _moved_back(step, shape: torch.Size, R: Any, values) -> Tensor | None:
    """The transpose of a reshape, a permute or a swap of two axes applied to R directly (None
    for other routes)."""
    if not isinstance(R, Tensor) or R.numel() != shape.numel():  # (`view(dtype)` is no reshape)
        return None
    kind = type(step.module) if step.module is not None else step.node.target
    if kind in _RESHAPES:
        return R.reshape(shape)
    if kind in _SWAPS:
        args, _ = step.arguments(values)
        return R.transpose(*args[1:3]) if len(args) == 3 else None
    if kind in _PERMUTES:
        args, kwargs = step.arguments(values)
        rest = args[1:] or (kwargs.get("dims"),)  # permute(0, 2, 1), permute((0, 2, 1)), permute(x, dims=…)
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        if not all(isinstance(d, int) for d in dims):
            return None
        order = [d % len(shape) for d in dims]
        inverse = sorted(range(len(order)), key=order.__getitem__)
        return R.permute(inverse)
    return None


def constant_pad(step, values) -> tuple[tuple[int, ...], float] | None:
    """(amounts, value) of a constant pad (`nn.ZeroPadNd`, `nn.ConstantPadNd`, `F.pad` in mode
    "constant"), or None for any other route. linear.py reads a zero pad through with it."""
    if step.module is not None:
        if not isinstance(step.module, CONSTANT_PAD_MODULES):
            return None
        return tuple(int(a) for a in step.module.padding), step.module.value
    if step.node.op != "call_function" or step.node.target is not F.pad:
        return None
    args, kwargs = step.arguments(values)
    if (args[2] if len(args) > 2 else kwargs.get("mode", "constant")) != "constant":
        return None
    amounts = args[1] if len(args) > 1 else kwargs["pad"]
    return tuple(int(a) for a in amounts), args[3] if len(args) > 3 else kwargs.get("value", 0.0)


def _padded_positions(function, a: Tensor) -> Tensor:
    """The mask of a constant pad's added elements: where the output does not follow the input
    (pad(1) and pad(0) agree there, whatever the constant)."""
    ones, zeros = torch.ones_like(a), torch.zeros_like(a)
    with torch.no_grad():
        return function(ones) == function(zeros)


def first_operand(step) -> fx.Node:
    """The routed tensor: the call's first argument. `c.expand_as(x)` of a constant `c` depends
    on the input only through x's shape; relevance reaching it would have nowhere to go."""
    first = step.node.args[0] if step.node.args else step.inputs[0]
    if first not in step.inputs:
        raise UnsupportedLayerError(f"'{step.node.name}'{in_module(step.node)} routes a constant shaped like an "
                                    "input-dependent tensor; relprop has no rule for relevance that reaches it")
    return first


def _padding_value(value: Any) -> bool:
    return isinstance(value, (int, float)) and (math.isfinite(value) or value == float("-inf"))


def _fill_value(node: fx.Node) -> Any:
    value = positional(node, 2, "value")
    return float(value) if isinstance(value, (int, float)) else None
