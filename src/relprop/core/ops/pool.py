"""Linear maps that average or resample: average, adaptive-average, sum and mean pooling,
interpolation (`F.interpolate`, `nn.Upsample`) in every mode, and `F.fold`/`nn.Fold` (VOLO's
outlook attention: overlapping patches summed back into an image, a sum of copies). Relevance
goes in proportion to each input's share, the z-rule (LRP-0) of a linear layer (Bach et al. 2015;
Montavon et al. 2019): `R_i = x_i · Σ_j w_ij R_j / y_j`, through the map's transpose by a vjp (the
composite's pooling rule: the exact z-rule, or the reference code's ε-stabilized one).

Bicubic interpolation (crossvit's image resize) has negative weights, but each output's weights
still sum to 1, so the z-rule conserves exactly (an output at 0 spreads its relevance by those
weights); its negative lobes overshoot, so a non-negative input can give negative outputs: it does
not keep the sign (the next layer's z+ then weighs the negative part). A rule that needs a weight
matrix to clamp (z+, W⁺, flat) has none to take from a resize."""

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
    positional,
)

# Interpolation modes whose weights are non-negative (bilinear with antialias too: a triangle filter)
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
        return node.target is F.interpolate or super().claim(node)

    def output_nonnegative(self, step, parents: list[bool]) -> bool:
        """A resize with negative weights (bicubic, antialiased or not) overshoots below 0."""
        if isinstance(step.module, nn.Upsample):
            mode = step.module.mode
        elif step.node.target is F.interpolate:
            mode = positional(step.node, 3, "mode", "nearest")
        else:
            mode = None
        return (mode is None or mode in POSITIVE_INTERPOLATION) and super().output_nonnegative(step, parents)

    def relevance(self, step, values, R, context: Context) -> Parents:
        parent = step.inputs[0]
        fn = step.as_function_of_first_input(values)
        return [(parent, context.strategies.pooling.relevance(fn, values[parent], R))]
