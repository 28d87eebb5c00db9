"""Max pooling: the composite's max-pool strategy says which linear map stands in for the max,
and the pooling rule distributes relevance over it.

Strategies (``maxpool=`` of a `Composite`, by object or name):
- `AverageWindows` (``"avg"``): the pool's own windows, summed: relevance in proportion to the
  activations in each window (the z-rule's per-window divisor cancels, so an average serves); a
  window with a negative value (a pool of BatchNorm outputs, NASNet/PNASNet) to its maximum;
- `WinnerTakesAll` (``"wta"``): all relevance of a window to its maximum;
- `ReferenceAverage2x2`: the reference code's stand-in, a 2×2 average whatever the pool.
A strategy of your own: any object with `function(geometry, dims, where) -> (Tensor -> Tensor)`.

Max reductions (`x.amax(dim)`, `x.max(dim)`, `torch.amax`/`torch.max` with a dim: Hiera's
query pooling, VOLO's class-token head) are max pooling with one window over the reduced
dimensions, and take the same strategy through its `reduction(dims, keepdim)`: winner-takes-all
gives all relevance to the maximum (ties share it, as the gradient of amax), the proportional
strategies the sum's z-rule (relevance in proportion to the reduced values). Both conserve.
`torch.max(a, b)` of two tensors is an elementwise maximum, not a reduction: left unclaimed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from relprop.core.aliases import named
from relprop.core.ops.base import Context, KeepsSign, Op, Parents, positional
from relprop.errors import UnsupportedLayerError

MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d}
# max reductions over dimensions (a max pool with one window): by function and tensor method
REDUCTIONS = {torch.amax, torch.max, "amax", "max"}
# what F.max_poolNd dispatch to when traced (boolean-dispatched private functions)
PRIVATE_NAMES = ("_max_pool1d", "_max_pool2d", "_max_pool3d")


class Geometry(NamedTuple):
    kernel: Any
    stride: Any
    padding: Any
    dilation: Any
    ceil_mode: bool


class MaxPoolStrategy(Protocol):
    def function(self, geometry: Geometry, dims: int, where: str) -> Callable[[Tensor], Tensor]: ...


@dataclass(frozen=True)
class AverageWindows:
    """Relevance in proportion to the activations in each of the pool's windows that holds no
    negative value (after a ReLU: every window); a window with a negative value gives all its
    relevance to its maximum, as winner-takes-all. The proportional share is a z-rule over the
    window's sum, which for signed values can be near 0 while the max is not: the shares then
    grow without bound and cancel (|R| ×40 per pool on timm's pnasnet5large, whose pools read
    BatchNorm outputs, and a total of −1 × p at the image). Both parts conserve per window.
    −inf elements (a 'same' pool's padding) take no share and never win."""

    def function(self, geometry: Geometry, dims: int, where: str) -> Callable[[Tensor], Tensor]:
        if any(d != 1 for d in _as_tuple(geometry.dilation)):
            raise UnsupportedLayerError(f"max pooling with dilation {geometry.dilation} at '{where}': use maxpool='wta'")
        avg_pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
        max_pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]

        def windows(t: Tensor) -> Tensor:
            padded = torch.isneginf(t)
            minus = (-t.detach()).masked_fill(padded, float("-inf"))  # the padding left out of the min
            signed = max_pool(minus, *geometry) > 0  # the window's min is negative
            averaged = avg_pool(t.masked_fill(padded, 0.0), geometry.kernel, geometry.stride, geometry.padding,
                                geometry.ceil_mode, True)
            return torch.where(signed, max_pool(t, *geometry), averaged)

        return windows

    def reduction(self, dims: tuple[int, ...], keepdim: bool) -> Callable[[Tensor], Tensor]:
        return lambda t: t.sum(dims, keepdim)


@dataclass(frozen=True)
class WinnerTakesAll:
    """All relevance of a window to its maximum."""

    def function(self, geometry: Geometry, dims: int, where: str) -> Callable[[Tensor], Tensor]:
        max_pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
        return lambda t: max_pool(t, *geometry)

    def reduction(self, dims: tuple[int, ...], keepdim: bool) -> Callable[[Tensor], Tensor]:
        return lambda t: t.amax(dims, keepdim)


@dataclass(frozen=True)
class ReferenceAverage2x2:
    """The reference code's stand-in: `AvgPool2d(2)`, not the pool's own geometry."""

    def function(self, geometry: Geometry, dims: int, where: str) -> Callable[[Tensor], Tensor]:
        return lambda t: F.avg_pool2d(t, 2)

    def reduction(self, dims: tuple[int, ...], keepdim: bool) -> Callable[[Tensor], Tensor]:
        return lambda t: t.sum(dims, keepdim)  # the reference code has none: its stand-in's proportion


# name -> (strategy, its reference-numerics twin); the names are the composite's aliases
MAXPOOL_STRATEGIES: dict[str, tuple[MaxPoolStrategy, MaxPoolStrategy]] = {
    "avg": (AverageWindows(), ReferenceAverage2x2()),
    "wta": (WinnerTakesAll(), ReferenceAverage2x2()),
}


def maxpool_strategy(maxpool: str | MaxPoolStrategy, reference: bool = False) -> MaxPoolStrategy:
    """The strategy of a name (the reference code's stand-in with its numerics), or a strategy as it is."""
    if not isinstance(maxpool, str):
        return maxpool
    plain, reference_twin = named(maxpool, MAXPOOL_STRATEGIES, "maxpool rule")
    return reference_twin if reference else plain


class MaxPool(KeepsSign, Op):
    name = "maxpool"
    reads_its_arguments = True
    modules = MODULES

    functions = FUNCTIONS

    def claim(self, node: fx.Node) -> bool:
        if node.op in ("call_function", "call_method") and node.target in REDUCTIONS:
            # a reduction over a number of dims, or all; `max(a, b)` of two tensors is elementwise
            return isinstance(node.args[0], fx.Node) and not isinstance(positional(node, 1, "dim"), fx.Node) \
                and not isinstance(node.kwargs.get("other"), fx.Node)
        return super().claim(node) or (node.op == "call_function"
                                       and getattr(node.target, "__name__", "") in PRIVATE_NAMES)

    def relevance(self, step, values, R, context: Context) -> Parents:
        parent = step.inputs[0]
        if step.node.target in REDUCTIONS:
            return [(parent, self._reduction_relevance(step, values, R, context))]
        args, kwargs = step.arguments(values)
        if step.module is not None:
            pool = step.module
            geometry = Geometry(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        else:
            geometry = _geometry(*args[1:], **kwargs)
        fn = context.strategies.maxpool.function(geometry, args[0].dim() - 2, step.node.name)
        return [(parent, pooled_relevance(context, fn, values[parent], R))]


    @staticmethod
    def _reduction_relevance(step, values, R, context: Context) -> Tensor:
        node, x = step.node, values[parent_of(step)]
        dim, keepdim = positional(node, 1, "dim"), bool(positional(node, 2, "keepdim", False))
        dims = tuple(range(x.dim())) if dim in (None, (), []) else tuple(_as_tuple(dim))
        if isinstance(R, (list, tuple)):  # `x.max(dim)` gives (values, indices): the values' relevance
            R = R[0]
        strategy = context.strategies.maxpool
        if not hasattr(strategy, "reduction"):
            raise UnsupportedLayerError(f"the max reduction '{node.name}' needs a max-pool strategy with "
                                        f"reduction(dims, keepdim); {type(strategy).__name__} has none")
        return pooled_relevance(context, strategy.reduction(dims, keepdim), x, R)


def pooled_relevance(context: Context, fn: Callable[[Tensor], Tensor], x: Tensor, R: Tensor) -> Tensor:
    """The pooling rule over `fn`. Elements at −inf (a 'same' max pool's padding, timm's
    MaxPool2dSame: the max's neutral element, a constant) take none: they stay −inf for a max
    (never the winner) and count 0 for a proportional strategy (no share of the sum)."""
    padded = torch.isneginf(x)
    if not padded.any():
        return context.strategies.pooling.relevance(fn, x, R)
    finite = x.masked_fill(padded, 0.0)
    fill = float("-inf") if torch.isfinite(fn(x)).all() else 0.0  # a max keeps −inf out; a sum would be −inf
    return context.strategies.pooling.relevance(lambda t: fn(t.masked_fill(padded, fill)), finite, R)


def parent_of(step) -> fx.Node:
    return step.inputs[0]


def _geometry(kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False) -> Geometry:
    return Geometry(kernel_size, stride if stride not in (None, []) else kernel_size, padding, dilation, ceil_mode)


def _as_tuple(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
