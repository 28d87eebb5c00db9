"""Nodes relevance crosses unchanged: activations, normalizations, dropout, identity, and the
libraries' helpers that are the identity in eval mode (timm's mask add, torchvision's stochastic
depth). A rule the user gives such a layer (by name or type) is applied instead.

Elementwise nonlinearities and normalizations take the identity rule (AttnLRP, Achtibat et al.
2024, and its LXT code: elementwise activations; LayerNorm and GroupNorm with the divisor held
constant, "identity on the normalization"). The same two reasons cover:
- RMSNorm (`nn.RMSNorm`, `F.rms_norm`: DeepSeek's and Gemma's ViTs): `x / rms(x) · w` with the
  RMS held constant, as LayerNorm's std, is a diagonal scaling: identity;
- Tanh and Sigmoid (a head's Tanh, a sigmoid whose output is read as a value): elementwise and
  monotone, each output depends on one input only, so the identity rule is the one conserving
  choice (a sigmoid that gates a product is the product's business: see scale.py);
- a power with a constant exponent (`x ** 2`, squared ReLU, `.square()`): elementwise, so the
  identity rule (after a ReLU it is monotone, as the other activations);
- `F.normalize` (cosine attention in Swin v2, XCiT, EdgeNeXt): `x / ‖x‖` with the norm held
  constant, as LayerNorm's std in LXT, is a positive diagonal scaling: identity;
- `neg` (rotary embeddings' `rotate_half`): `−x` sends relevance back unchanged (the z-rule of
  a one-input linear map);
- `type_as`: a dtype cast;
- `clamp`/`clip` with input-independent bounds (Gemma 4's clamped linear layers): elementwise and
  piecewise linear, a hard tanh; identity, as ReLU6 (input-dependent bounds are refused: they
  would take relevance the identity rule cannot give them)."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from relprop.core.linear_op import BatchNormStats
from relprop.core.ops.base import Context, KeepsSign, Op, Parents, positional
from relprop.core.ops.route import first_operand
from relprop.core.rules import GroupNormParams, LayerNormParams, Rule
from relprop.core.trace import in_module, module_path
from relprop.errors import UnsupportedLayerError

# torchvision's FrozenBatchNorm2d (pretrained detectors' backbones) computes an eval-mode BatchNorm
BATCHNORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, FrozenBatchNorm2d)
NORM_MODULES = (*BATCHNORM_MODULES, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
                      nn.ELU, nn.Mish, nn.Tanh, nn.Sigmoid)
# activations whose output lies in [0, 1] (or [−1, 1]): what gates a product (see scale.py)
SQUASHING_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Tanh)
SQUASHING_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.tanh, F.tanh}
SQUASHING_METHODS = {"sigmoid", "sigmoid_", "tanh", "tanh_"}
POWER_FUNCTIONS = {operator.pow, torch.pow, torch.square}
IDENTITY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
NORM_FUNCTIONS = {F.batch_norm, F.layer_norm, F.group_norm, F.rms_norm}
DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout}
RELU_FUNCTIONS = {F.relu, torch.relu, F.relu6}
ACTIVATION_FUNCTIONS = {*RELU_FUNCTIONS, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish,
                        *SQUASHING_FUNCTIONS}
ACTIVATION_METHODS = {"relu", "relu_", *SQUASHING_METHODS}
FUNCTIONS = {*ACTIVATION_FUNCTIONS, *DROPOUT_FUNCTIONS, *NORM_FUNCTIONS, F.normalize, operator.neg, torch.neg}
METHODS = {*ACTIVATION_METHODS, "contiguous", "clone", "detach", "float", "to", "type", "type_as", "neg"}
POWER_METHODS = {"pow", "square"}
CLAMP_FUNCTIONS = {torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max}
CLAMP_METHODS = {"clamp", "clip", "clamp_min", "clamp_max", "clamp_", "clip_", "clamp_min_", "clamp_max_"}
# normalization calls a rule can take: the module type whose rule they follow, the rule's view of
# the call's arguments, the call's parameter names after the input, and how its first one is read
NORM_CALLS = {
    F.layer_norm: (nn.LayerNorm, LayerNormParams, ("normalized_shape", "weight", "bias", "eps"), tuple),
    F.group_norm: (nn.GroupNorm, GroupNormParams, ("num_groups", "weight", "bias", "eps"), int),
}
# Library helpers that are the identity here, by importable name (no import of the library needed).
LIBRARY_FUNCTIONS = {
    "timm.layers.attention.maybe_add_mask",  # scores + a constant mask (or None): the scores keep it all
    "torchvision.ops.stochastic_depth.stochastic_depth",  # traced in eval mode: training=False
}


@dataclass
class PassInfo:
    folded_into: fx.Node | None = None  # a BatchNorm folded into a linear layer, which accounts for it


class Passthrough(KeepsSign, Op):
    name = "passthrough"
    reads_its_arguments = True
    modules = (*NORM_MODULES, *ACTIVATION_MODULES, *IDENTITY_MODULES)
    keeps_the_input_layer = True
    functions, methods, library_functions = FUNCTIONS, METHODS, LIBRARY_FUNCTIONS

    def claim(self, node: fx.Node) -> bool:
        if node.target in POWER_FUNCTIONS or (node.op == "call_method" and node.target in POWER_METHODS):
            return _constant_exponent(node)
        if _is_clamp(node):
            return bool(node.args) and isinstance(node.args[0], fx.Node)
        return super().claim(node)

    def make_info(self) -> PassInfo:
        return PassInfo()

    def forward(self, step, args: tuple, kwargs: dict, model: nn.Module) -> Any:
        module, node = step.module, step.node
        if isinstance(module, BATCHNORM_MODULES):
            return _batch_norm(module, args[0])
        if isinstance(module, IDENTITY_MODULES) or (node.op == "call_function" and node.target in DROPOUT_FUNCTIONS):
            return args[0]
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            return F.relu(args[0]) if isinstance(module, nn.ReLU) else F.relu6(args[0])
        return super().forward(step, args, kwargs, model)

    def output_is_fresh(self, step) -> bool:
        return isinstance(step.module, BATCHNORM_MODULES)  # `_batch_norm`'s result; others may alias

    def record_in_place(self, step, args: tuple, kwargs: dict) -> Any | None:
        """ReLU (module or call) into its input's memory: what the model itself does with
        `nn.ReLU(inplace=True)`, where the engine otherwise writes a fresh tensor per ReLU."""
        node = step.node
        relu = isinstance(step.module, nn.ReLU) or (node.op == "call_function" and node.target in (F.relu, torch.relu)
                                                    ) or (node.op == "call_method" and node.target == "relu")
        if not relu or not isinstance(args[0], Tensor) or len(args) > 1 or any(k != "inplace" for k in kwargs):
            return None
        return torch.relu_(args[0])

    def record(self, step, args: tuple, kwargs: dict, context: Context) -> tuple[Any, Any]:
        """A LayerNorm whose rule reads its statistics (norm-ε) runs as `torch.native_layer_norm`,
        the kernel `F.layer_norm` calls (the same output bit for bit), and keeps its `rstd`."""
        norm = self._norm_with_stats(step, args, kwargs, context)
        if norm is None:
            return super().record(step, args, kwargs, context)
        output, _, rstd = torch.native_layer_norm(args[0], norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        return output, rstd

    def relevance(self, step, values, R, context: Context) -> Parents:
        parent = first_operand(step) if step.module is None else step.inputs[0]
        if _is_clamp(step.node) and len(step.inputs) > 1:
            raise UnsupportedLayerError(f"'{step.node.name}'{in_module(step.node)} clamps by input-dependent "
                                        "bounds; relprop has no rule for relevance that reaches them")
        rule, layer = self._user_rule(step, values, context)
        if rule is None or step.info.folded_into is not None:
            return [(parent, R.reshape(values[parent].shape))]
        rstd = getattr(values, "parts", {}).get(step.node)
        if rstd is not None:
            return [(parent, rule.relevance_from_stats(layer, values[parent], R, values[step.node], rstd))]
        return [(parent, rule.relevance(layer, values[parent], R))]

    def backward_reads(self, step, context: Context) -> list[fx.Node]:
        """Relevance that passes unchanged reads only its input's shape; a user rule, the values
        (and a LayerNorm's rule that reads its statistics, its output)."""
        rule = self._rule_of(step, context)
        if step.info.folded_into is None and rule is not None:
            reads = super().backward_reads(step, context)
            return [*reads, step.node] if _keeps_norm_stats(step, rule) else reads
        return []

    def _norm_with_stats(self, step, args: tuple, kwargs: dict, context: Context) -> LayerNormParams | None:
        """The LayerNorm's arguments where its rule reads the forward's statistics and the
        kernel takes them as they are (fp32 input and parameters); None elsewhere."""
        node, module = step.node, step.module
        if step.info.folded_into is not None or not _keeps_norm_stats(step, self._rule_of(step, context)):
            return None
        norm = LayerNormParams(tuple(module.normalized_shape), module.weight, module.bias, module.eps) \
            if module is not None else _norm_params(node, args, kwargs)
        tensors = [t for t in (args[0], norm.weight, norm.bias) if t is not None]
        if not all(isinstance(t, Tensor) and t.dtype == torch.float32 for t in tensors):
            return None
        return norm

    @staticmethod
    def _rule_of(step, context: Context) -> Rule | None:
        """A rule by module name or type; for `F.layer_norm` (`F.group_norm`), a rule for
        nn.LayerNorm (nn.GroupNorm) or for the module type the call sits in (timm's LayerNorm, a
        subclass with its own forward)."""
        node = step.node
        if step.module is not None:
            return context.rules.by_name(node) or context.rules.by_kind(step, context.model)
        if node.op != "call_function" or node.target not in NORM_CALLS:
            return None
        path = module_path(node)
        return context.rules.by_type(NORM_CALLS[node.target][0],
                                     *([type(context.model.get_submodule(path))] if path else []))

    def _user_rule(self, step, values, context: Context) -> tuple[Rule | None, Any]:
        """The user's rule for this step (`_rule_of`) and the layer it takes: the module, or the
        call's arguments (`LayerNormParams`, `GroupNormParams`)."""
        rule = self._rule_of(step, context)
        if rule is None or step.module is not None:
            return rule, step.module
        args, kwargs = step.arguments(values)
        return rule, _norm_params(step.node, args, kwargs)

    def output_nonnegative(self, step, parents: list[bool]) -> bool:
        node = step.node
        if isinstance(step.module, (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid)) \
                or (node.op == "call_function" and node.target in {*RELU_FUNCTIONS, torch.sigmoid, F.sigmoid,
                                                                   F.hardsigmoid}) \
                or (node.op == "call_method" and node.target in {"relu", "relu_", "sigmoid", "sigmoid_"}):
            return True
        if node.target in {operator.neg, torch.neg, "neg"}:
            return False
        if _is_clamp(node):  # non-negative only by a lower bound >= 0 (an upper bound < 0 flips it)
            low = positional(node, 1, "min")
            return node.target not in ("clamp_max", torch.clamp_max, "clamp_max_") \
                and isinstance(low, (int, float)) and low >= 0
        if node.target in POWER_FUNCTIONS or (node.op == "call_method" and node.target in POWER_METHODS):
            exponent = 2 if node.target in (torch.square, "square") else node.args[1]
            return float(exponent) % 2 == 0 or super().output_nonnegative(step, parents)
        return not self.normalizes(step) and super().output_nonnegative(step, parents)

    @staticmethod
    def gating_rank(step) -> int | None:
        """How gate-like this node's output is, for a product of two unrelated factors (scale.py):
        2 for a squashing activation (sigmoid, hard sigmoid, tanh), 1 for another activation, 0
        for a normalization or a power; None for the identity (dropout, casts): look further back."""
        node, module = step.node, step.module
        if isinstance(module, SQUASHING_MODULES) or node.target in SQUASHING_FUNCTIONS \
                or (node.op == "call_method" and node.target in SQUASHING_METHODS):
            return 2
        if isinstance(module, ACTIVATION_MODULES) or node.target in ACTIVATION_FUNCTIONS \
                or (node.op == "call_method" and node.target in ACTIVATION_METHODS):
            return 1
        if isinstance(module, IDENTITY_MODULES) or node.target in DROPOUT_FUNCTIONS \
                or node.op == "call_method" and node.target in METHODS - ACTIVATION_METHODS - {"neg"}:
            return None
        return 0

    @staticmethod
    def normalizes(step) -> bool:
        """BatchNorm, LayerNorm, GroupNorm, RMSNorm (modules or functional) shift and rescale: a
        non-negative input can come out negative, unlike the other identity-rule nodes."""
        node = step.node
        return isinstance(step.module, NORM_MODULES) or (node.op == "call_function" and node.target in NORM_FUNCTIONS)


def _norm_params(node: fx.Node, args: tuple, kwargs: dict) -> LayerNormParams | GroupNormParams:
    """A normalization call's arguments as its rule takes them (`NORM_CALLS`)."""
    _, params, names, read = NORM_CALLS[node.target]
    bound = dict(zip(("input", *names), args, strict=False)) | kwargs
    return params(read(bound[names[0]]), bound.get("weight"), bound.get("bias"), float(bound.get("eps", 1e-5)))


def _keeps_norm_stats(step, rule: Rule | None) -> bool:
    """Whether this step is a LayerNorm (module or `F.layer_norm` call) whose rule takes its
    forward statistics (`relevance_from_stats` of its own): then the forward keeps them."""
    node = step.node
    layer_norm = isinstance(step.module, nn.LayerNorm) or (node.op == "call_function" and node.target is F.layer_norm)
    return layer_norm and rule is not None and type(rule).relevance_from_stats is not Rule.relevance_from_stats


def _is_clamp(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in CLAMP_FUNCTIONS) \
        or (node.op == "call_method" and node.target in CLAMP_METHODS)


def _constant_exponent(node: fx.Node) -> bool:
    """`x ** p`, `torch.pow(x, p)`, `x.pow(p)`, `x.square()` with a number p and a tensor x: an
    elementwise power (a constant raised to the input, `2 ** x`, is left unclaimed)."""
    if node.target in (torch.square, "square"):
        return True
    base, exponent = node.args[0], positional(node, 1, "exponent")
    return isinstance(base, fx.Node) and isinstance(exponent, (int, float))


BATCH_NORM_PARAMETERS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def batch_norm_arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    """`F.batch_norm`'s arguments by name, however the call spelled them."""
    return dict(zip(BATCH_NORM_PARAMETERS, args, strict=False)) | dict(kwargs)


def is_foldable_batchnorm(step) -> bool:
    """A BatchNorm in eval mode with running statistics (module or `F.batch_norm` call)."""
    if not isinstance(step.op, Passthrough):
        return False
    if isinstance(step.module, BATCHNORM_MODULES):
        return step.module.running_mean is not None and step.module.running_var is not None
    node = step.node
    if node.op == "call_function" and node.target is F.batch_norm:
        bound = batch_norm_arguments(node.args, node.kwargs)
        return bound.get("training", False) is False and bound.get("running_mean") is not None \
            and bound.get("running_var") is not None
    return False


def batchnorm_stats(step, values: dict[fx.Node, Any]) -> BatchNormStats:
    """What a foldable BatchNorm step computes, from its module or its call's arguments."""
    if step.module is not None:
        return BatchNormStats.of(step.module)
    args, kwargs = step.arguments(values)
    bound = batch_norm_arguments(args, kwargs)
    return BatchNormStats(bound["running_mean"], bound["running_var"], bound.get("weight"),
                          bound.get("bias"), float(bound.get("eps", 1e-5)))


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """Eval-mode BatchNorm in fp32 (batch statistics only where the module keeps none)."""
    def as_float(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.float()

    use_batch_stats = module.running_mean is None
    return F.batch_norm(
        x, as_float(module.running_mean), as_float(module.running_var), as_float(module.weight),
        as_float(module.bias), use_batch_stats, 0.0, module.eps,
    )
