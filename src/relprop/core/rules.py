"""LRP rules for linear-like layers (Linear, ConvNd, ConvTransposeNd) and pooling.

Every rule for a linear layer is one normalisation of the layer's contributions
`z_ij = x_i w_ij`: it picks *what* counts as a contribution (modified inputs and weights,
the "terms"), sums them into `z_j`, divides the output relevance by `z_j` and sends it back
through the transposed layer. Transposed ops are called directly (`conv2d_input`, matmul):
no autograd graph is built for the expensive layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from relprop.core.linear_op import LinearOp, as_linear_op
from relprop.core.numerics import (
    NEGATIVE_WEIGHT,
    POSITIVE_WEIGHT,
    TINY,
    safe_divide,
    scratch_like,
    stabilize,
    total,
    vjp,
)
from relprop.errors import ConfigError, UnsupportedLayerError


class Rule:
    """Base class. `relevance(layer, a, R_out)` returns the relevance of the layer's input `a`.

    A rule declares what the engine may rely on: `bn_invariant` (its result does not change when
    a BatchNorm with positive scales is folded into the layer, so BatchNorm can be passed
    through) and `wants_nonnegative` (its `relevance` takes `nonnegative=True`, the engine's
    promise that `a >= 0`, and skips checking)."""

    name = "rule"
    bn_invariant: ClassVar[bool] = False
    wants_nonnegative: ClassVar[bool] = False

    def relevance(self, layer: nn.Module, a: Tensor, R: Tensor) -> Tensor:
        raise NotImplementedError

    def relevance_from_output(self, layer: nn.Module | LinearOp, a: Tensor, R: Tensor, output: Tensor) -> Tensor:
        """`relevance`, given the layer's output `W a + b` exactly as the layer computes it (the
        forward pass recorded it): a rule whose denominator is that output need not recompute it."""
        return self.relevance(layer, a, R)

    def relevance_from_stats(self, layer: nn.Module, a: Tensor, R: Tensor, output: Tensor, rstd: Tensor) -> Tensor:
        """`relevance` of a LayerNorm, given its output and `rstd` from the forward pass (a rule
        that overrides this makes the engine keep them)."""
        return self.relevance(layer, a, R)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PassRule(Rule):
    """Relevance goes through unchanged (ReLU, BatchNorm, Dropout, Identity, L2Norm...)."""

    name = "pass"
    bn_invariant = True

    def relevance(self, layer: nn.Module, a: Tensor, R: Tensor) -> Tensor:
        return R.reshape(a.shape)


def _uniform_fallback(op: LinearOp, R: Tensor, shape: torch.Size, weight: Tensor) -> Tensor:
    """Distribute R uniformly over each output's receptive field (positions and channels)."""
    ones_weight = torch.ones_like(weight)
    count = op.forward(torch.ones(shape, dtype=R.dtype, device=R.device), ones_weight)
    s, _ = safe_divide(R, count)
    return op.transpose(s, ones_weight, shape)


def _weight_proportional(op: LinearOp, R: Tensor, shape: torch.Size, weight: Tensor) -> Tensor:
    """Distribute R in proportion to `weight` alone (as if every input were 1); uniform where
    an output has no such weight at all, so nothing is lost."""
    z = op.forward(torch.ones(shape, dtype=R.dtype, device=R.device), weight)
    if bool(z.amin() > TINY) and z.shape == R.shape:  # the usual case: no fallback, so no masks
        return op.transpose(torch.div(R, z, out=z), weight, shape)
    s, zero = safe_divide(R, z)
    R_in = op.transpose(s, weight, shape)
    leftover = R.masked_fill(~zero, 0.0)
    if bool(leftover.any()):
        R_in = R_in + _uniform_fallback(op, leftover, shape, weight)
    return R_in


def _distribute(op: LinearOp, terms: list[tuple[Tensor, Tensor]], R: Tensor, shape: torch.Size,
                fallback_weight: Tensor) -> Tensor:
    """R in proportion to the contributions `Σ_terms x_i w_ij`, exactly conservative.

    Requires each input's total contribution to be >= 0 (z+, zB). Then a zero `z_j` means every
    contribution to it is zero, so whatever `s_j` is there sends nothing back, and that
    relevance goes by `fallback_weight` proportions instead (uniform where those are zero too).
    """
    R = R.detach()
    terms = [(x.detach(), wt) for x, wt in terms]
    z = total(op.forward(x, wt) for x, wt in terms)
    if bool(z.min() > TINY):  # the usual case: every output has a positive contribution
        s = torch.div(R, z, out=z)  # z is ours: reuse its memory (large temporaries are slow)
        return total(op.transpose(s, wt, shape).mul_(x) for x, wt in terms)
    zero = z <= TINY
    R_in = total(x * op.transpose(R / z.masked_fill(zero, 1.0), wt, shape) for x, wt in terms)
    leftover = R.masked_fill(~zero, 0.0)
    if bool(leftover.any()):
        R_in = R_in + _weight_proportional(op, leftover, shape, fallback_weight)
    return R_in


class ZPlusRule(Rule):
    """z+: positive contributions only (`a⁺w⁺ + a⁻w⁻`), biases kept out, exactly conservative.

    Where an output has no positive contribution its relevance falls back to w⁺ proportions,
    then to a uniform split, so no relevance is dropped.
    """

    name = "zplus"
    bn_invariant = True
    wants_nonnegative = True

    def __init__(self, cache_weights: bool = False) -> None:
        """`cache_weights=True` keeps every layer's w⁺ between calls (a copy of the network's
        weights held for the explainer's lifetime: 97 MiB on ResNet-50, over half the input
        gradient's peak at batch 1) instead of clamping per call (about 2 % of a ResNet-50 call
        at batch 1, docs/benchmarks.md)."""
        self.cache_weights = cache_weights
        self._positive_weights: dict[int, tuple[tuple, Tensor]] = {}

    def _positive_weight(self, layer: nn.Module | LinearOp, op: LinearOp) -> Tensor:
        """w⁺: clamped per call, or with `cache_weights` once per op, or per module and weight
        version (re-used for every image)."""
        if not self.cache_weights:  # w⁺ dies with the call: into the walk's scratch, if any
            return torch.clamp(op.weight, min=0, out=scratch_like(op.weight, POSITIVE_WEIGHT))
        if isinstance(layer, LinearOp):
            return layer.positive_weight
        key = (layer.weight._version, layer.weight.data_ptr(), op.weight.dtype, op.weight.device)
        cached = self._positive_weights.get(id(layer))
        if cached is None or cached[0] != key:
            cached = (key, op.positive_weight)
            self._positive_weights[id(layer)] = cached
        return cached[1]

    def relevance(self, layer: nn.Module | LinearOp, a: Tensor, R: Tensor, nonnegative: bool = False) -> Tensor:
        """`nonnegative=True` promises `a >= 0` (the engine knows it after a ReLU)."""
        op = as_linear_op(layer)
        w = op.weight
        w_pos = self._positive_weight(layer, op)
        if nonnegative or bool(a.min() >= 0):  # the usual case: skip the negative part
            terms = [(a, w_pos)]
        else:
            w_neg = torch.clamp(w, max=0, out=scratch_like(w, NEGATIVE_WEIGHT))  # dies with the call
            terms = [(a.clamp(min=0), w_pos), (a.clamp(max=0), w_neg)]
        return _distribute(op, terms, R, a.shape, w_pos)

    def __repr__(self) -> str:
        return "ZPlusRule(cache_weights=True)" if self.cache_weights else "ZPlusRule()"


class WPlusRule(Rule):
    """Input-layer rule of the reference code: the input is replaced by ones, so relevance is
    distributed by w⁺ alone (uniform where an output sees no positive weight)."""

    name = "wplus"
    bn_invariant = True

    def relevance(self, layer: nn.Module, a: Tensor, R: Tensor) -> Tensor:
        op = as_linear_op(layer)
        return _weight_proportional(op, R, a.shape, op.weight.clamp(min=0))


class WSquareRule(Rule):
    """w²: relevance in proportion to the squared weights (input-independent)."""

    name = "w2"

    def relevance(self, layer: nn.Module, a: Tensor, R: Tensor) -> Tensor:
        op = as_linear_op(layer)
        return _weight_proportional(op, R, a.shape, op.weight.square())


class FlatRule(Rule):
    """flat: relevance spread uniformly over each output's receptive field."""

    name = "flat"

    def relevance(self, layer: nn.Module, a: Tensor, R: Tensor) -> Tensor:
        op = as_linear_op(layer)
        return _uniform_fallback(op, R, a.shape, op.weight)


class EpsilonRule(Rule):
    """ε: plain z-rule with a stabilizer; relevance absorbed by ε and biases is lost."""

    name = "epsilon"

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def _weights(self, op: LinearOp) -> tuple[Tensor, Tensor | None]:
        return op.weight, op.bias

    def relevance(self, layer: nn.Module, a: Tensor, R: Tensor) -> Tensor:
        op = as_linear_op(layer)
        w, b = self._weights(op)
        return self._propagate(op, a, R, op.forward(a, w, b), w)

    def relevance_from_output(self, layer: nn.Module | LinearOp, a: Tensor, R: Tensor, output: Tensor) -> Tensor:
        """The recorded output is the denominator: one matrix product (the transpose) per layer
        instead of two, the same numbers. A subclass that changes the weights or the rule
        recomputes as it says."""
        if type(self).relevance is not EpsilonRule.relevance or type(self)._weights is not EpsilonRule._weights:
            return self.relevance(layer, a, R)
        op = as_linear_op(layer)
        return self._propagate(op, a, R, output.reshape_as(R), op.weight)

    def _propagate(self, op: LinearOp, a: Tensor, R: Tensor, z: Tensor, w: Tensor) -> Tensor:
        # s lives until the transposed product has read it: the walk's scratch can hold it
        z = stabilize(z, self.epsilon, out=scratch_like(z) if z.shape == R.shape else None)
        if self.epsilon > TINY and z.shape == R.shape:  # |z| >= ε: no zero denominators, no masks;
            s = torch.div(R, z, out=z)  # z is ours (stabilize made it) to overwrite
        else:  # ε = 0 (LRP-0): an output that is exactly 0 (a bias-free layer on a zero window) gets
            # R/z = 0, as the gradient × input identity has it, not 0/0 = NaN
            s, _ = safe_divide(R, z)
        return op.transpose(s, w, a.shape).mul_(a)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(epsilon={self.epsilon})"


class GammaRule(EpsilonRule):
    """γ, generalized to signed inputs and outputs (Andéol et al. 2021): where the layer's output
    is positive, contributions of its own sign are favoured (`w + γw⁺` on a⁺, `w + γw⁻` on a⁻),
    where it is negative, the negative ones. On non-negative inputs and positive outputs it is
    the original γ rule; the generalization keeps the denominator away from zero where relevance
    reaches negative pre-activations (residual branches under the signed split)."""

    name = "gamma"

    def __init__(self, gamma: float = 0.25, epsilon: float = 1e-6) -> None:
        super().__init__(epsilon)
        self.gamma = gamma

    def _favour(self, w: Tensor, positive: bool) -> Tensor:
        return w + self.gamma * (w.clamp(min=0) if positive else w.clamp(max=0))

    def relevance(self, layer: nn.Module, a: Tensor, R: Tensor) -> Tensor:
        op = as_linear_op(layer)
        w, b = op.weight, op.bias
        a_pos, a_neg = a.clamp(min=0), a.clamp(max=0)
        z = op.forward(a, w, b)
        R_in = torch.zeros_like(a)
        for sign, mask in ((True, z > 0), (False, z < 0)):
            w_same, w_other = self._favour(w, sign), self._favour(w, not sign)
            bias = None if b is None else self._favour(b, sign)
            denominator = op.forward(a_pos, w_same, bias) + op.forward(a_neg, w_other)
            s = R.masked_fill(~mask, 0.0) / stabilize(denominator, self.epsilon)
            R_in = R_in + a_pos * op.transpose(s, w_same, a.shape) + a_neg * op.transpose(s, w_other, a.shape)
        return R_in

    def __repr__(self) -> str:
        return f"GammaRule(gamma={self.gamma}, epsilon={self.epsilon})"


class AlphaBetaRule(Rule):
    """αβ: positive and negative contributions normalised separately, α·R⁺ − β·R⁻ (α − β = 1).
    Biases are kept out, so α1β0 equals z+ on non-negative inputs."""

    def __init__(self, alpha: float = 1.0, beta: float = 0.0) -> None:
        if abs(alpha - beta - 1.0) > 1e-9:
            raise ConfigError(f"alpha - beta must be 1 (got alpha={alpha}, beta={beta})")
        self.alpha, self.beta = alpha, beta
        self.name = f"alpha{alpha:g}beta{beta:g}"

    def _part(self, op: LinearOp, a: tuple[Tensor, Tensor], w: tuple[Tensor, Tensor], R: Tensor,
              positive: bool) -> Tensor:
        """The positive (or negative) contributions' share of R, from (a⁺, a⁻) and (w⁺, w⁻)."""
        (a_pos, a_neg), (w_pos, w_neg) = a, w
        terms = [(a_pos, w_pos), (a_neg, w_neg)] if positive else [(a_pos, w_neg), (a_neg, w_pos)]
        z = total(op.forward(x, wt) for x, wt in terms)
        s, _ = safe_divide(R, z)
        return total(x * op.transpose(s, wt, a_pos.shape) for x, wt in terms)

    def relevance(self, layer: nn.Module, a: Tensor, R: Tensor) -> Tensor:
        op = as_linear_op(layer)
        w = op.weight  # w⁺ and w⁻ die with the call: into the walk's scratch, if any (both parts read them)
        signed_weights = (torch.clamp(w, min=0, out=scratch_like(w, POSITIVE_WEIGHT)),
                          torch.clamp(w, max=0, out=scratch_like(w, NEGATIVE_WEIGHT)))
        signed_inputs = (a.clamp(min=0), a.clamp(max=0))
        R_in = self.alpha * self._part(op, signed_inputs, signed_weights, R, positive=True)
        if self.beta:
            R_in = R_in - self.beta * self._part(op, signed_inputs, signed_weights, R, positive=False)
        return R_in

    def __repr__(self) -> str:
        return f"AlphaBetaRule(alpha={self.alpha}, beta={self.beta})"


class ZBRule(Rule):
    """zB (box rule) for the input layer: inputs bounded by [low, high], e.g. the normalised
    images of pixel values 0 and 1."""

    name = "zb"

    def __init__(self, low: Tensor | float, high: Tensor | float) -> None:
        self.low, self.high = low, high

    @classmethod
    def from_normalization(cls, mean: list[float], std: list[float]) -> ZBRule:
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        return cls((0.0 - mean_t) / std_t, (1.0 - mean_t) / std_t)

    def _bound(self, bound: Tensor | float, a: Tensor) -> Tensor:
        """Per-channel bounds broadcast to `a`: (N, C, ...) inputs, or flattened (N, C·H·W)."""
        if isinstance(bound, Tensor) and bound.numel() > 1:
            bound = bound.to(device=a.device, dtype=a.dtype).flatten()
            if a.dim() == 2:
                bound = bound.repeat_interleave(a.shape[1] // bound.numel()).reshape(1, -1)
            else:
                bound = bound.reshape(1, -1, *([1] * (a.dim() - 2)))
        return torch.zeros_like(a) + bound

    def relevance(self, layer: nn.Module, a: Tensor, R: Tensor) -> Tensor:
        op = as_linear_op(layer)
        w = op.weight
        w_pos, w_neg = w.clamp(min=0), w.clamp(max=0)
        low, high = self._bound(self.low, a), self._bound(self.high, a)
        terms = [(a, w), (low, -w_pos), (high, -w_neg)]  # per input: w⁺(a - low) + w⁻(a - high) >= 0
        return _distribute(op, terms, R, a.shape, w_pos)


class ReferenceZPlusRule(Rule):
    """The reference code's z+: `z = conv(a, w⁺) + b + 1e-5` (linear: bias dropped); leaks."""

    name = "reference-zplus"

    def __init__(self, epsilon: float = 1e-5, ones_input: bool = False) -> None:
        self.epsilon = epsilon
        self.ones_input = ones_input

    def relevance(self, layer: nn.Module, a: Tensor, R: Tensor) -> Tensor:
        op = as_linear_op(layer)
        if self.ones_input:
            a = torch.ones_like(a)
        w_pos = op.weight.clamp(min=0)
        bias = op.bias if op.kind != "linear" else None
        z = op.forward(a, w_pos, bias) + self.epsilon
        return a * op.transpose(R / z, w_pos, a.shape)


# --- pooling and other positive linear maps ---------------------------------------------


def proportional(fn: Callable[[Tensor], Tensor], a: Tensor, R: Tensor, epsilon: float = 0.0) -> Tensor:
    """z-rule for a linear map with non-negative weights (sum or average pooling): relevance
    in proportion to each input's share. With epsilon=0 it conserves exactly: outputs whose
    inputs sum to zero spread their relevance uniformly over their window."""
    if epsilon:
        return a * vjp(fn, a, R / (fn(a) + epsilon))
    z = fn(a)
    if bool(z.amin() > TINY):  # the usual case: no output to fall back from (safe_divide's masks skipped)
        return a * vjp(fn, a, R / z)
    s, zero = safe_divide(R, z)
    R_in = a * vjp(fn, a, s)
    leftover = R.masked_fill(~zero, 0.0)
    if bool(leftover.any()):
        ones = torch.ones_like(a)
        s_uniform, _ = safe_divide(leftover, fn(ones))
        R_in = R_in + vjp(fn, ones, s_uniform)
    return R_in


class ProportionalRule(Rule):
    """For positive linear maps given as a module or function (pooling, upsampling, a custom
    aggregation): relevance in proportion to each input's share of each output (the z-rule)."""

    name = "proportional"
    bn_invariant = True

    def __init__(self, epsilon: float = 0.0) -> None:
        self.epsilon = epsilon  # 0: exact; the reference code's pooling adds 1e-5 (and leaks)

    def relevance(self, layer: Callable[[Tensor], Tensor], a: Tensor, R: Tensor) -> Tensor:
        return proportional(layer, a, R, self.epsilon)

    def __repr__(self) -> str:
        return f"ProportionalRule(epsilon={self.epsilon})" if self.epsilon else "ProportionalRule()"


class LayerNormParams(NamedTuple):
    """The arguments of an `F.layer_norm` call, for rules that need them."""

    normalized_shape: tuple[int, ...]
    weight: Tensor | None
    bias: Tensor | None
    eps: float


class GroupNormParams(NamedTuple):
    """The arguments of an `F.group_norm` call, for rules that need them."""

    num_groups: int
    weight: Tensor | None
    bias: Tensor | None
    eps: float


class NormEpsilonRule(Rule):
    """LayerNorm or GroupNorm with its standard deviation held constant: then a linear map
    (centring, scale, shift), taken by the ε-rule; the shift (β) absorbs its share. This is what
    LXT's AttnLRP code computes for LayerNorm; relprop's default is the identity ("pass"). With
    ε = 0 it is LRP-0 of that linear map: gradient x input of the norm with its std detached."""

    name = "norm-epsilon"

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def relevance(self, layer: nn.Module | LayerNormParams | GroupNormParams, a: Tensor, R: Tensor) -> Tensor:
        if isinstance(layer, (nn.GroupNorm, GroupNormParams)):
            # groups of consecutive channels (with everything after them) are LayerNorm's last axis;
            # the affine parameters are per channel, over the same view
            groups = a.reshape(a.shape[0], layer.num_groups, -1)
            per_channel = (1, a.shape[1], *(1,) * (a.dim() - 2))

            def per_group(p: Tensor) -> Tensor:
                return p.detach().float().reshape(per_channel).expand(a.shape).reshape(groups.shape)

            weight = 1.0 if layer.weight is None else per_group(layer.weight)
            bias = 0.0 if layer.bias is None else per_group(layer.bias)
            return self._normalized(groups, (-1,), layer.eps, weight, bias, R.reshape(groups.shape)).reshape(a.shape)
        if not isinstance(layer, (nn.LayerNorm, LayerNormParams)):
            raise UnsupportedLayerError("the norm-epsilon rule takes nn.LayerNorm or nn.GroupNorm, "
                                        f"not {type(layer).__name__}")
        dims = tuple(range(-len(layer.normalized_shape), 0))
        weight = 1.0 if layer.weight is None else layer.weight.detach().float()
        bias = 0.0 if layer.bias is None else layer.bias.detach().float()
        return self._normalized(a, dims, layer.eps, weight, bias, R)

    def relevance_from_stats(self, layer: nn.Module | LayerNormParams, a: Tensor, R: Tensor, output: Tensor,
                             rstd: Tensor) -> Tensor:
        """`relevance` of a LayerNorm given what its forward pass computed: its output (the ε
        denominator) and `rstd = 1/std` (`torch.native_layer_norm`'s), so the walk recomputes
        neither the variance (slow on the CPU: as costly as the layer's own forward kernel many
        times over) nor the normalization. The same map to float rounding (the variance is taken
        by the forward's kernel). A subclass that changes the rule recomputes as it says."""
        if type(self).relevance is not NormEpsilonRule.relevance \
                or type(self)._normalized is not NormEpsilonRule._normalized:
            return self.relevance(layer, a, R)
        dims = tuple(range(-len(layer.normalized_shape), 0))
        z = stabilize(output.reshape(a.shape), self.epsilon)
        u = torch.div(R.reshape(a.shape), z, out=z)  # z is ours (stabilize made it) to overwrite
        if layer.weight is not None:
            u.mul_(layer.weight.detach().float())
        u.mul_(rstd)
        # the transpose of the centring (symmetric), then the input's share
        return u.sub_(u.mean(dims, keepdim=True)).mul_(a)

    def _normalized(self, a: Tensor, dims: tuple[int, ...], eps: float, weight: Tensor | float,
                    bias: Tensor | float, R: Tensor) -> Tensor:
        """The ε-rule of `(a - mean) / std · weight + bias` over `dims`, std held constant."""
        std = (a.var(dims, unbiased=False, keepdim=True) + eps).sqrt()

        def normalize(t: Tensor) -> Tensor:
            return (t - t.mean(dims, keepdim=True)) / std * weight

        z = normalize(a) + bias
        s = R / stabilize(z, self.epsilon)
        # the transpose of `normalize` written out (what autograd computes for it, without the graph):
        # scale by w/std, then centre (the centring is symmetric)
        u = s * weight / std
        count = math.prod(a.shape[d] for d in dims)
        return a * (u + (-u).sum(dims, keepdim=True) / count)


RULES: dict[str, Callable[[], Rule]] = {
    "norm-epsilon": NormEpsilonRule,
    "zplus": ZPlusRule,
    "wplus": WPlusRule,
    "w2": WSquareRule,
    "flat": FlatRule,
    "epsilon": EpsilonRule,
    "gamma": GammaRule,
    "alpha1beta0": lambda: AlphaBetaRule(1.0, 0.0),
    "alpha2beta1": lambda: AlphaBetaRule(2.0, 1.0),
    "pass": PassRule,
    "proportional": ProportionalRule,
}


def get_rule(rule: str | Rule, mean: list[float] | None = None, std: list[float] | None = None) -> Rule:
    """A rule by name ('zplus', 'epsilon', 'gamma', 'alpha1beta0', 'alpha2beta1', 'zb', 'flat',
    'w2', 'wplus', 'pass', 'proportional') or a Rule instance as it is. 'zb' needs the normalization mean/std."""
    if isinstance(rule, Rule):
        return rule
    if rule == "zb":
        if mean is None or std is None:
            raise ConfigError("the zB rule needs the input normalization: pass mean=... and std=...")
        return ZBRule.from_normalization(mean, std)
    try:
        return RULES[rule]()
    except KeyError:
        names = ", ".join(sorted(rule_names()))
        raise ConfigError(f"unknown rule {rule!r}; choose one of: {names}") from None


def rule_names() -> tuple[str, ...]:
    """Every rule name `get_rule` takes (what the docs list): the registry's, and 'zb'."""
    return (*RULES, "zb")
