"""Positive linear maps: average, adaptive-average, sum and mean pooling and upsampling by
non-negative interpolation weights, and `F.fold`/`nn.Fold` (VOLO's outlook attention: overlapping
patches summed back into an image, a sum of copies). Relevance goes in proportion to each input's share (the
composite's pooling rule: the exact z-rule, or the reference code's stabilized one)."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from relprop.core.ops.base import (
    Context,
    KeepsSign,
    Op,
    Parents,
    describe,
    function_key,
    positional,
    type_key,
    unsupported,
)

# Upsampling modes whose interpolation weights are non-negative: relevance goes in proportion.
POSITIVE_INTERPOLATION = {"nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area"}
MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
           nn.AdaptiveAvgPool3d, nn.Upsample, nn.Fold)
FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
             F.adaptive_avg_pool3d, torch.mean, torch.sum, F.fold}
METHODS = {"mean", "sum"}


class Pool(KeepsSign, Op):
    name = "pool"
    reads_its_arguments = True
    modules = MODULES
    functions, methods = FUNCTIONS, METHODS

    def claim(self, node: fx.Node) -> bool:
        if node.target is F.interpolate:
            mode = positional(node, 3, "mode", "nearest")
            if mode not in POSITIVE_INTERPOLATION:
                raise unsupported(f"{describe(node, None)} in mode {mode!r} (its interpolation weights can be "
                                  "negative)", function_key(node.target))
            return True
        return super().claim(node)

    def check_module(self, node: fx.Node, module: nn.Module) -> None:
        if isinstance(module, nn.Upsample) and module.mode not in POSITIVE_INTERPOLATION:
            raise unsupported(f"{describe(node, module)} in mode {module.mode!r} (its interpolation weights "
                              "can be negative)", type_key(type(module)))

    def relevance(self, step, values, R, context: Context) -> Parents:
        parent = step.inputs[0]
        fn = step.as_function_of_first_input(values)
        return [(parent, context.strategies.pooling.relevance(fn, values[parent], R))]
