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
from relprop.core.numerics import TINY
from relprop.core.ops.base import Context, KeepsSign, Op, Parents, positional
from relprop.core.rules import ProportionalRule
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
            if bool(t.amin() >= 0):  # after a ReLU: no window for its maximum, no padding (amin: 15x `any`)
                return avg_pool(t, geometry.kernel, geometry.stride, geometry.padding, geometry.ceil_mode, True)
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
    modules = MODULES

    functions = FUNCTIONS

    def claim(self, node: fx.Node) -> bool:
        if node.op in ("call_function", "call_method") and node.target in REDUCTIONS:
            # a reduction over a number of dims, or all; `max(a, b)` of two tensors is elementwise
            return isinstance(node.args[0], fx.Node) and not isinstance(positional(node, 1, "dim"), fx.Node) \
                and not isinstance(node.kwargs.get("other"), fx.Node)
        return super().claim(node) or (node.op == "call_function"
                                       and getattr(node.target, "__name__", "") in PRIVATE_NAMES)

    def record(self, step, args: tuple, kwargs: dict, context: Context) -> tuple[Any, Any]:
        """A 2-d pool whose relevance goes to its winners by the exact z-rule runs as
        `aten.max_pool2d_with_indices` (the kernel `F.max_pool2d` calls: the same maxima) and
        keeps the indices: the walk then scatters R/z to them, where it re-ran the pool twice
        (its value, then autograd's forward for the transpose: 8 ms each on ResNet-50's stem)."""
        if not _keeps_winners(step, context) or not _is_fp32(args[0]):
            return super().record(step, args, kwargs, context)
        output, indices = torch.ops.aten.max_pool2d_with_indices(args[0], *_aten_geometry(step, args, kwargs))
        return output, indices

    def backward_reads(self, step, context: Context) -> list[fx.Node]:
        """The input; with the winners kept, the output too (the z-rule's denominator)."""
        return [*step.node.all_input_nodes, *([step.node] if _keeps_winners(step, context) else [])]

    def relevance(self, step, values, R, context: Context) -> Parents:
        parent = step.inputs[0]
        if step.node.target in REDUCTIONS:
            return [(parent, self._reduction_relevance(step, values, R, context))]
        args, kwargs = step.arguments(values)
        indices = getattr(values, "parts", {}).get(step.node)
        if indices is not None:
            scattered = _to_winners(values[parent], values[step.node], R, indices, _aten_geometry(step, args, kwargs))
            if scattered is not None:
                return [(parent, scattered)]
        fn = context.strategies.maxpool.function(_step_geometry(step, args, kwargs), args[0].dim() - 2,
                                                 step.node.name)
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
    if bool(x.amin() > float("-inf")):  # the usual case, tested as a reduction (15x faster than `any`)
        return context.strategies.pooling.relevance(fn, x, R)
    padded = torch.isneginf(x)
    if not padded.any():
        return context.strategies.pooling.relevance(fn, x, R)
    finite = x.masked_fill(padded, 0.0)
    fill = float("-inf") if torch.isfinite(fn(x)).all() else 0.0  # a max keeps −inf out; a sum would be −inf
    return context.strategies.pooling.relevance(lambda t: fn(t.masked_fill(padded, fill)), finite, R)


def _keeps_winners(step, context: Context) -> bool:
    """Whether the forward keeps this pool's argmax: a 2-d max pool (module or call, without
    `return_indices`) under winner-takes-all with the exact z-rule, whose transpose is the
    scatter to the indices (a rule or strategy of the user's takes the general path)."""
    node = step.node
    pool_2d = isinstance(step.module, nn.MaxPool2d) or (
        node.op == "call_function" and (node.target is F.max_pool2d or getattr(node.target, "__name__", "") == "_max_pool2d"))
    indices = step.module.return_indices if step.module is not None else positional(node, 6, "return_indices")
    if not pool_2d or indices:
        return False
    pooling = context.strategies.pooling
    return type(context.strategies.maxpool) is WinnerTakesAll and type(pooling) is ProportionalRule \
        and pooling.epsilon == 0


def _to_winners(x: Tensor, z: Tensor, R: Tensor, indices: Tensor, geometry: tuple) -> Tensor | None:
    """The z-rule over the max, `x · scatter(R / z)`, from the forward's maxima and argmax: the
    numbers `ProportionalRule` computes with autograd, bit for bit. A window of zeros sends its
    relevance to its first element, as the rule's fallback does (the argmax of ones; for an
    input >= 0 that is the window's own argmax). None for signed inputs or a max in (0, TINY]
    (argmax and fallback differ there): the general path takes those."""
    if not bool(x.amin() >= 0):  # (−inf padding and NaN too)
        return None
    R = R.reshape(z.shape)

    def scatter(s: Tensor) -> Tensor:
        return torch.ops.aten.max_pool2d_with_indices_backward(s, x, *geometry, indices)

    if bool(z.amin() > TINY):
        return scatter(R / z).mul_(x)
    zero = z <= TINY
    if bool(z.masked_select(zero).any()):
        return None
    R_in = scatter((R / z.masked_fill(zero, 1.0)).masked_fill_(zero, 0.0)).mul_(x)
    leftover = R.masked_fill(~zero, 0.0)
    return R_in + scatter(leftover) if bool(leftover.any()) else R_in


def _step_geometry(step, args: tuple, kwargs: dict) -> Geometry:
    if step.module is not None:
        pool = step.module
        return Geometry(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
    return _geometry(*args[1:], **kwargs)


def _aten_geometry(step, args: tuple, kwargs: dict) -> tuple:
    """kernel, stride, padding, dilation, ceil_mode as `aten.max_pool2d_with_indices` takes them."""
    kernel, stride, padding, dilation, ceil_mode = _step_geometry(step, args, kwargs)
    return _pair(kernel), _pair(stride), _pair(padding), _pair(dilation), bool(ceil_mode)


def _pair(value: int | tuple[int, ...]) -> list[int]:
    values = _as_tuple(value)
    return list(values * 2) if len(values) == 1 else list(values)


def _is_fp32(x: Any) -> bool:
    return isinstance(x, Tensor) and x.dtype == torch.float32


def parent_of(step) -> fx.Node:
    return step.inputs[0]


def _geometry(kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False) -> Geometry:
    return Geometry(kernel_size, stride if stride not in (None, []) else kernel_size, padding, dilation, ceil_mode)


def _as_tuple(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
