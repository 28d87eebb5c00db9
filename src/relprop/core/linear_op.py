"""`LinearOp`: the one linear map `y = W x (+ b)` that every linear rule normalises, whether it
came from a module, from a functional call or from folding a BatchNorm into either."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relprop.errors import ConfigError, UnsupportedLayerError

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, *CONV_TYPES, *CONV_TRANSPOSE_TYPES)
LINEAR_FUNCTIONS: dict[Callable, type[nn.Module]] = {
    F.linear: nn.Linear, F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d,
}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclass(frozen=True, eq=False)
class LinearOp:
    """A linear map `y = W x (+ b)`, the thing every linear rule normalises, evaluable with
    any weight: a dense layer, an N-d convolution or a transposed convolution.

    Built from a module (`as_linear_op`) or from the arguments of a functional call, and with
    BatchNorm folded in (`fold_batchnorm`), so rules never see which of these it came from.
    `bias` is per output channel or, after folding a BatchNorm *before* a padded conv, a map of
    the output's shape (the padding sees zeros, not the shifted values).
    """

    weight: Tensor
    bias: Tensor | None = None
    kind: str = "linear"  # "linear", "conv" or "conv_transpose"
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    output_padding: tuple[int, ...] = ()

    @property
    def dims(self) -> int:
        return self.weight.dim() - 2

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if self.kind == "linear":
            y = F.linear(x, weight)
        elif self.kind == "conv":
            y = _CONV[self.dims](x, weight, None, self.stride, self.padding, self.dilation, self.groups)
        else:
            y = _CONV_T[self.dims](x, weight, None, self.stride, self.padding, self.output_padding,
                                   self.groups, self.dilation)
        if bias is None:
            return y
        bias = self._broadcast_bias(bias, y)
        if bias.dtype == y.dtype and torch.broadcast_shapes(bias.shape, y.shape) == y.shape:
            return y.add_(bias)  # y is ours: in place, the same sum without a fresh (page-faulted) tensor
        return y + bias

    def _broadcast_bias(self, bias: Tensor, y: Tensor) -> Tensor:
        if bias.dim() == 1 and self.kind != "linear":
            return bias.reshape(-1, *([1] * self.dims))
        return bias

    def transpose(self, s: Tensor, weight: Tensor, input_shape: torch.Size) -> Tensor:
        if self.kind == "linear":
            return s @ weight
        if self.kind == "conv":
            if self._pointwise(weight) and s.shape[2:].numel() >= _POINTWISE_MIN_POSITIONS:
                return _pointwise_transpose(s, weight, input_shape)
            if self._patchwise(weight, s.shape, input_shape):
                return _patchwise_transpose(s, weight, input_shape)
            return _CONV_T[self.dims](s, weight, None, self.stride, self.padding,
                                      self._dropped(s.shape, input_shape), self.groups, self.dilation)
        return _CONV[self.dims](s, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def _plain_windows(self) -> bool:
        """One group, no padding, no dilation: each output reads one window of every channel."""
        return self.groups == 1 and not any(self.padding) and all(v == 1 for v in self.dilation)

    def _pointwise(self, weight: Tensor) -> bool:
        """A 1×1 conv, stride 1, no padding, one group: a matrix product at every position."""
        return self._plain_windows() and all(k == 1 for k in weight.shape[2:]) and all(v == 1 for v in self.stride)

    def _patchwise(self, weight: Tensor, output_shape: torch.Size, input_shape: torch.Size) -> bool:
        """A patch embedding: windows that tile the input (stride = kernel, no padding, one
        group), each of at least `_PATCHWISE_MIN_AREA` pixels."""
        kernel = tuple(weight.shape[2:])
        return self._plain_windows() and math.prod(kernel) >= _PATCHWISE_MIN_AREA and self.stride == kernel \
            and tuple(input_shape[2:]) == tuple(o * k for o, k in zip(output_shape[2:], kernel, strict=True))

    def _dropped(self, output_shape: torch.Size, input_shape: torch.Size) -> tuple[int, ...]:
        """The rows/columns a strided convolution dropped, which its transpose must restore."""
        kernel = self.weight.shape[2:]
        return tuple(
            input_shape[2 + d] - ((output_shape[2 + d] - 1) * self.stride[d] - 2 * self.padding[d]
                                  + self.dilation[d] * (kernel[d] - 1) + 1)
            for d in range(self.dims)
        )

    def with_params(self, weight: Tensor, bias: Tensor | None) -> LinearOp:
        return replace(self, weight=weight, bias=bias)

    @cached_property
    def positive_weight(self) -> Tensor:
        return self.weight.clamp(min=0)


# From this many positions (14×14) a 1×1 conv's transpose runs as one batched matrix product:
# 25 % faster than `conv_transpose2d`'s col2im path at batch 1 on ResNet-50's 1×1 layers, 32 %
# at batch 16, the same bits at batch 1 and 2 (float rounding apart at 16, where the conv takes
# another kernel); below it (7×7 maps at batch 16) the conv path is faster.
_POINTWISE_MIN_POSITIONS = 196


def _pointwise_transpose(s: Tensor, weight: Tensor, input_shape: torch.Size) -> Tensor:
    """`conv_transpose(s, W)` of a pointwise conv: `Wᵀ s` at every position, one batched GEMM."""
    batch, channels = s.shape[:2]
    return torch.matmul(weight.reshape(channels, -1).t(), s.reshape(batch, channels, -1)).view(input_shape)


# From this many pixels per window (4×4) a patch embedding's transpose runs as one matrix
# product and a reshuffle: ViT-B/16's 16×16 patches 7.9 → 2.2 ms at batch 1 (111 → 36 ms at 16),
# the 4×4 stems of ConvNeXt and Swin 0.9 → 0.4 ms; below it (2×2 downsamplings over many
# channels) the reshuffle costs more than `conv_transpose2d`'s own path.
_PATCHWISE_MIN_AREA = 16


def _patchwise_transpose(s: Tensor, weight: Tensor, input_shape: torch.Size) -> Tensor:
    """`conv_transpose(s, W)` of a conv whose windows tile its input: each position's `Wᵀ s`
    is its window's pixels, one GEMM over all positions, then put in place."""
    batch, channels, *positions = s.shape
    kernel = weight.shape[2:]
    patches = torch.matmul(s.reshape(batch, channels, -1).transpose(1, 2), weight.reshape(channels, -1))
    dims = len(kernel)  # (batch, *positions, in_channels, *kernel) → (batch, in_channels, p₁, k₁, p₂, k₂, …)
    order = [0, dims + 1, *(axis for d in range(dims) for axis in (1 + d, dims + 2 + d))]
    return patches.view(batch, *positions, input_shape[1], *kernel).permute(order).reshape(input_shape)


def as_linear_op(layer: nn.Module | LinearOp) -> LinearOp:
    """The linear map of a Linear, ConvNd or ConvTransposeNd module (or an op as it is)."""
    if isinstance(layer, LinearOp):
        return layer
    weight = layer.weight.detach().float() if isinstance(layer, LINEAR_TYPES) else None
    bias = None if getattr(layer, "bias", None) is None else layer.bias.detach().float()
    if isinstance(layer, nn.Linear):
        return LinearOp(weight, bias)
    if isinstance(layer, (*CONV_TYPES, *CONV_TRANSPOSE_TYPES)):
        if layer.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"{type(layer).__name__} with padding_mode={layer.padding_mode!r} is not supported "
                "(only 'zeros')"
            )
        transposed = isinstance(layer, CONV_TRANSPOSE_TYPES)
        padding = layer.padding
        if isinstance(padding, str):
            padding = conv_padding(padding, layer.kernel_size, layer.dilation)
        return LinearOp(weight, bias, "conv_transpose" if transposed else "conv", tuple(layer.stride),
                        tuple(padding), tuple(layer.dilation), layer.groups,
                        tuple(layer.output_padding) if transposed else ())
    raise UnsupportedLayerError(
        f"{type(layer).__name__} is not a linear layer; linear rules take Linear, ConvNd or ConvTransposeNd"
    )


def conv_padding(padding: str, kernel_size: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    """Numeric padding for 'valid' and symmetric 'same' (transposes need numbers)."""
    if padding == "valid":
        return tuple(0 for _ in kernel_size)
    total = [d * (k - 1) for k, d in zip(kernel_size, dilation, strict=True)]
    if any(t % 2 for t in total):
        raise UnsupportedLayerError(
            f"padding='same' with kernel {tuple(kernel_size)} pads asymmetrically; relprop supports "
            "symmetric padding only"
        )
    return tuple(t // 2 for t in total)


def functional_linear_op(function: Callable, args: tuple, kwargs: dict) -> LinearOp:
    """The op of a functional call `F.linear(x, w, b)` or `F.convNd(x, w, b, stride, ...)`, with
    the argument values of this forward pass (timm's weight-standardised convs compute `w`)."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, args, strict=False)) | dict(kwargs)
    weight = bound["weight"].detach().float()
    bias = bound.get("bias")
    bias = None if bias is None else bias.detach().float()
    if function is F.linear:
        return LinearOp(weight, bias)
    dims = weight.dim() - 2

    def tup(value: Any, default: int) -> tuple[int, ...]:
        value = default if value is None else value
        return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims

    dilation = tup(bound.get("dilation"), 1)
    padding = bound.get("padding", 0)
    if isinstance(padding, str):
        padding = conv_padding(padding, tuple(weight.shape[2:]), dilation)
    return LinearOp(weight, bias, "conv", tup(bound.get("stride"), 1), tup(padding, 0), dilation,
                    int(bound.get("groups") or 1))


def module_forward(module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """The module's output computed by its LinearOp in fp32 (the precision relevance needs)."""
    op = as_linear_op(module)
    if args[1:] or kwargs:  # ConvTranspose's output_size: a shape-dependent output padding
        raise UnsupportedLayerError(f"{type(module).__name__} called with output_size is not supported")
    return op.forward(args[0], op.weight, op.bias)


class BatchNormStats(NamedTuple):
    """What an eval-mode BatchNorm computes: `y = (x − mean)/√(var + eps)·weight + bias`."""

    mean: Tensor
    var: Tensor
    weight: Tensor | None
    bias: Tensor | None
    eps: float

    @classmethod
    def of(cls, bn: nn.modules.batchnorm._BatchNorm) -> BatchNormStats:
        return cls(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """`y = s·x + t`."""
        scale = (self.var.detach().float() + self.eps).rsqrt()
        if self.weight is not None:
            scale = scale * self.weight.detach().float()
        shift = -self.mean.detach().float() * scale
        if self.bias is not None:
            shift = shift + self.bias.detach().float()
        return scale, shift


def fold_batchnorm(op: LinearOp, bn: BatchNormStats, before: bool = False,
                   input_shape: torch.Size | None = None, out: Tensor | None = None) -> LinearOp:
    """The effective layer of `BN(op(x))` (or of `op(BN(x))` with `before=True`), as the LRP
    literature canonizes it: `W' = W·s`, `b' = (b − μ)·s + β` with `s = γ/√(σ²+ε)`. `out`:
    where to write W' of a fold after the layer (a buffer of the weight's shape)."""
    scale, shift = bn.scale_shift()
    if before:
        return _fold_before(op, scale, shift, input_shape)
    if op.kind == "conv_transpose" and op.groups > 1:
        raise UnsupportedLayerError("folding a BatchNorm into a grouped transposed conv is not supported")
    channel_axis = 1 if op.kind == "conv_transpose" else 0
    shape = [1] * op.weight.dim()
    shape[channel_axis] = -1
    bias = shift if op.bias is None else op.bias * scale + shift
    if out is not None and out.dtype != torch.result_type(op.weight, scale):
        out = None  # W' takes the promoted type, as a fresh product would
    return op.with_params(torch.mul(op.weight, scale.reshape(shape), out=out), bias)


def _fold_before(op: LinearOp, scale: Tensor, shift: Tensor, input_shape: torch.Size | None) -> LinearOp:
    """`op(s·x + t) = op'(x) + op(t)`. The constant `op(t)` is evaluated exactly: per channel
    without padding, as a map of the output's shape where padding sees zeros instead of t."""
    if op.kind == "conv_transpose":
        raise UnsupportedLayerError("folding a BatchNorm into a following transposed conv is not supported")
    if input_shape is None:
        raise ConfigError("folding a BatchNorm into the layer after it needs the input shape")
    if op.kind == "linear":
        weight = op.weight * scale
        constant = op.forward(shift.reshape(1, -1), op.weight, op.bias)[0]
        return op.with_params(weight, constant)
    per_group = [op.groups, 1, op.weight.shape[1]] + [1] * op.dims
    grouped = op.weight.reshape(op.groups, -1, *op.weight.shape[1:])
    weight = (grouped * scale.reshape(per_group)).reshape(op.weight.shape)
    t = shift.reshape(1, -1, *([1] * op.dims)).expand(1, *input_shape[1:])
    constant = op.forward(t, op.weight, op.bias)[0]  # (C_out, *spatial)
    if not any(op.padding):
        constant = constant.flatten(1)[:, 0]
    return op.with_params(weight, constant)
