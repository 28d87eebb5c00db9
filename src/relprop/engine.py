"""The graph interpreter: one forward pass that keeps every node's output, then one walk
over the nodes in reverse that applies one rule per node kind.

Relevance of a node used several times (fan-out) is the sum of what each consumer sends
back. Residual adds are where relevance is split between skip and branch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from relprop import graph as g
from relprop.errors import InputError, UnsupportedLayerError
from relprop.rules import (
    PassRule,
    ReferenceZPlusRule,
    Rule,
    ZPlusRule,
    get_rule,
    proportional,
    vjp,
)
from relprop.splitting import Splitter

RuleSpec = str | Rule
MAXPOOL_RULES = ("avg", "wta")


@dataclass
class Record:
    """What the forward pass kept: every node's value; `output` as the model returns it."""

    values: dict[fx.Node, Any]
    output: Any


@dataclass
class Backward:
    """Relevance at the input and, per report group, the relevance that left the group."""

    input: Tensor
    layer_sums: OrderedDict[str, Tensor] = field(default_factory=OrderedDict)


class RelevanceEngine:
    """LRP over any traceable module (tensor, tuple, list or dict outputs).

    `rules` maps module types (or qualified module names) to rule names or `Rule` objects;
    module types given there become graph leaves, so custom layers can be supported with
    `rules={MyLayer: "pass"}` or `rules={MyLayer: MyRule()}`. Conv2d and Linear use z+ unless
    told otherwise, the layer that sees the image uses `input_rule`.
    """

    def __init__(
        self,
        module: nn.Module,
        split: str = "ratio",
        identity_skips: bool = True,
        rules: Mapping[type | str, RuleSpec] | None = None,
        input_rule: RuleSpec = "wplus",
        maxpool: str = "avg",
        mean: list[float] | None = None,
        std: list[float] | None = None,
        reference: bool = False,
    ) -> None:
        if maxpool not in MAXPOOL_RULES:
            raise ValueError(f"unknown maxpool rule {maxpool!r}; choose one of: {', '.join(MAXPOOL_RULES)}")
        self.module = module
        self.reference = reference
        self.maxpool = maxpool
        self.splitter = Splitter(split, identity_skips, reference=reference)
        rules = dict(rules or {})
        self._type_rules = {k: get_rule(v, mean, std) for k, v in rules.items() if isinstance(k, type)}
        self._name_rules = {k: get_rule(v, mean, std) for k, v in rules.items() if isinstance(k, str)}
        if reference:
            self._default_rule: Rule = ReferenceZPlusRule()
            self._input_rule: Rule = ReferenceZPlusRule(ones_input=True)
        else:
            self._default_rule = ZPlusRule()
            self._input_rule = get_rule(input_rule, mean, std)
        ruled_types = tuple(t for t in self._type_rules if not _is_builtin_linear(t))
        self.graph = g.trace(module, ruled_types)
        self.steps = g.build_steps(module, self.graph, ruled_types)
        inputs = [step for step in self.steps if step.kind == g.INPUT]
        if len(inputs) != 1:
            raise InputError(f"the model must take exactly one input tensor (it takes {len(inputs)})")
        self._input_step = inputs[0]
        self._step_of = {step.node: step for step in self.steps}

    # ---------------------------------------------------------------- forward

    @torch.no_grad()
    def forward(self, x: Tensor) -> Record:
        """Run the model in eval semantics and fp32, keeping every node's output."""
        x = x.float()
        values: dict[fx.Node, Any] = {}
        output = None
        for step in self.steps:
            node = step.node
            if node.op == "placeholder":
                values[node] = x
            elif node.op == "output":
                output = _load(node.args[0], values)
            else:
                values[node] = self._run_checked(step, values, x)
        return Record(values, output)

    def _run_checked(self, step: g.Step, values: dict[fx.Node, Any], x: Tensor) -> Any:
        try:
            return self._run(step, values)
        except RuntimeError as error:  # shape and dtype mismatches: say where, in one line
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            where = step.node.target if step.node.op == "call_module" else step.node.name
            raise InputError(
                f"the model cannot run on inputs of shape {tuple(x.shape)}: at '{where}': {first_line}"
            ) from error

    def _run(self, step: g.Step, values: dict[fx.Node, Any]) -> Any:
        node = step.node
        args, kwargs = _load(node.args, values), _load(node.kwargs, values)
        if node.op == "call_module":
            return _module_forward(step.module, args, kwargs)
        if node.op == "call_function":
            if node.target in (F.dropout, F.dropout1d, F.dropout2d, torch.dropout):
                return args[0]
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, node.target)(*rest, **kwargs)
        if node.op == "get_attr":
            return _get_attr(self.module, node.target)
        raise AssertionError(node.op)

    # ---------------------------------------------------------------- backward

    @torch.no_grad()
    def backward(self, record: Record, seed: Any, layer_sums: bool = False) -> Backward:
        """Propagate `seed` (same structure as `record.output`; None = no relevance) to the input;
        with `layer_sums`, also total the relevance that crosses each reported cut."""
        relevance: dict[fx.Node, Tensor] = {}
        sums: OrderedDict[str, Tensor] = OrderedDict()
        output_step = self.steps[-1]
        for node, R in _match_seed(output_step.node.args[0], seed):
            _accumulate(relevance, node, R)
        for step in reversed(self.steps):
            R = relevance.pop(step.node, None)
            if R is None or step.kind in (g.INPUT, g.CONSTANT, g.OUTPUT):
                if step.kind == g.INPUT and R is not None:
                    relevance[step.node] = R
                continue
            for parent, R_in in self._propagate(step, record.values, R):
                if layer_sums and step.group is not None and self._group(parent) != step.group:
                    total = R_in.reshape(R_in.shape[0], -1).sum(1)
                    sums[step.group] = sums[step.group] + total if step.group in sums else total
                _accumulate(relevance, parent, R_in)
        x = record.values[self._input_step.node]
        R_input = relevance.get(self._input_step.node, torch.zeros_like(x))
        return Backward(R_input, sums)

    def _group(self, node: fx.Node) -> str | None:
        return self._step_of[node].group

    def rule_for(self, step: g.Step) -> Rule:
        name = step.node.target if step.node.op == "call_module" else None
        if name in self._name_rules:
            return self._name_rules[name]
        for layer_type, rule in self._type_rules.items():
            if isinstance(step.module, layer_type):
                return rule
        if step.kind == g.LINEAR:
            return self._input_rule if step.is_input_layer else self._default_rule
        return PassRule()

    def _propagate(self, step: g.Step, values: dict[fx.Node, Any], R: Tensor) -> list[tuple[fx.Node, Tensor]]:
        node, kind = step.node, step.kind
        if kind in (g.LINEAR, g.CUSTOM):
            parent = step.inputs[0]
            rule = self.rule_for(step)
            if isinstance(rule, ZPlusRule) and self._step_of[parent].nonnegative:
                return [(parent, rule.relevance(step.module, values[parent], R, nonnegative=True))]
            return [(parent, rule.relevance(step.module, values[parent], R))]
        if kind == g.PASS:
            parent = step.inputs[0]
            return [(parent, R.reshape(values[parent].shape))]
        if kind == g.ADD:
            return self._add(step, values, R)
        if kind == g.SCALE:  # x * constant, or x * gate(x): all relevance stays with x
            parents = g.relevance_parents(step)
            if len(parents) != 1:
                raise UnsupportedLayerError(
                    f"'{node.name}'{g.in_module(node)} multiplies two unrelated input-dependent "
                    "tensors; relprop has no rule for that"
                )
            return [(parents[0], R.sum_to_size(values[parents[0]].shape))]
        if kind == g.CAT:
            return self._cat(node, values, R)
        if kind in (g.POOL, g.MAXPOOL, g.ROUTE):
            parent = step.inputs[0]
            fn = self._as_function_of_first_input(step, values)
            a = values[parent]
            if kind == g.ROUTE:
                return [(parent, vjp(fn, a, R))]
            epsilon = 1e-5 if self.reference else 0.0
            return [(parent, proportional(fn, a, R, epsilon))]
        if kind == g.META:
            if isinstance(values[node], Tensor):
                raise UnsupportedLayerError(f"no relevance rule for node '{node.name}' ({node.target})")
            return []
        raise AssertionError(kind)

    def _add(self, step: g.Step, values: dict[fx.Node, Any], R: Tensor) -> list[tuple[fx.Node, Tensor]]:
        first, second = step.node.args[0], step.node.args[1]
        dependent = [arg for arg in (first, second) if isinstance(arg, fx.Node) and arg in step.inputs]
        if len(dependent) == 1:  # x + constant: the constant gets nothing
            parent = dependent[0]
            return [(parent, R.sum_to_size(values[parent].shape))]
        a, b = values[first], values[second]
        R_a, R_b = self.splitter(R, a, b, step.skip)
        return [(first, R_a.sum_to_size(a.shape)), (second, R_b.sum_to_size(b.shape))]

    def _cat(self, node: fx.Node, values: dict[fx.Node, Any], R: Tensor) -> list[tuple[fx.Node, Tensor]]:
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        sizes = [values[t].shape[dim] if isinstance(t, fx.Node) else t.shape[dim] for t in tensors]
        pieces = torch.split(R, sizes, dim=dim)
        return [(t, piece) for t, piece in zip(tensors, pieces, strict=True)
                if isinstance(t, fx.Node) and isinstance(values[t], Tensor)]

    def _as_function_of_first_input(self, step: g.Step, values: dict[fx.Node, Any]) -> Callable[[Tensor], Tensor]:
        """The node as a function of its first tensor argument, everything else fixed."""
        node = step.node
        args, kwargs = _load(node.args, values), _load(node.kwargs, values)
        if step.kind == g.MAXPOOL:
            return self._maxpool_function(step, args, kwargs)
        if node.op == "call_module":
            return step.module
        if node.op == "call_method":
            return lambda t: getattr(t, node.target)(*args[1:], **kwargs)
        return lambda t: node.target(t, *args[1:], **kwargs)

    def _maxpool_function(self, step: g.Step, args: tuple, kwargs: dict) -> Callable[[Tensor], Tensor]:
        if self.reference:  # the reference code's stand-in: a 2x2 average, whatever the pool
            return lambda t: F.avg_pool2d(t, 2)
        if step.module is not None:
            pool = step.module
            geometry = (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        else:
            geometry = _maxpool_geometry(*args[1:], **kwargs)
        kernel, stride, padding, dilation, ceil_mode = geometry
        if self.maxpool == "wta":
            return lambda t: F.max_pool2d(t, kernel, stride, padding, dilation, ceil_mode)
        if dilation not in (1, (1, 1)):
            raise UnsupportedLayerError(
                f"max pooling with dilation {dilation} at '{step.node.name}': use maxpool='wta'"
            )
        return lambda t: F.avg_pool2d(t, kernel, stride, padding, ceil_mode, True, 1)


def _is_builtin_linear(layer_type: type) -> bool:
    return issubclass(layer_type, (nn.Conv2d, nn.Linear))


def _maxpool_geometry(kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    return kernel_size, stride if stride not in (None, []) else kernel_size, padding, dilation, ceil_mode


def _module_forward(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Eval-mode, fp32 forward of leaf modules, without touching the module itself."""
    if isinstance(module, nn.Conv2d):
        weight = module.weight.float()
        bias = None if module.bias is None else module.bias.float()
        return F.conv2d(args[0], weight, bias, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, nn.Linear):
        bias = None if module.bias is None else module.bias.float()
        return F.linear(args[0], module.weight.float(), bias)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return _batch_norm(module, args[0])
    if isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)):
        return args[0]
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return F.relu(args[0]) if isinstance(module, nn.ReLU) else F.relu6(args[0])
    return module(*args, **kwargs)


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    def as_float(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.float()

    use_batch_stats = module.running_mean is None
    return F.batch_norm(
        x, as_float(module.running_mean), as_float(module.running_var), as_float(module.weight),
        as_float(module.bias), use_batch_stats, 0.0, module.eps,
    )


def _get_attr(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value.float() if isinstance(value, Tensor) and value.is_floating_point() else value


def _load(arg: Any, values: dict[fx.Node, Any]) -> Any:
    return fx.node.map_arg(arg, lambda n: values[n])


def _accumulate(relevance: dict[fx.Node, Tensor], node: fx.Node, R: Tensor) -> None:
    """Fan-in: add in place. Every tensor held here belongs to the backward pass (seeds are
    copied on entry), so nothing the caller holds is changed."""
    if node in relevance:
        relevance[node].add_(R)
    else:
        relevance[node] = R


def _match_seed(structure: Any, seed: Any) -> list[tuple[fx.Node, Tensor]]:
    """Pairs (output node, seed tensor) for an output of any nesting of tuples/lists/dicts."""
    if seed is None:
        return []
    if isinstance(structure, fx.Node):
        if not isinstance(seed, Tensor):
            raise InputError(f"seed for output '{structure.name}' must be a tensor, got {type(seed).__name__}")
        return [(structure, seed.float().clone())]
    if isinstance(structure, (tuple, list)):
        if not isinstance(seed, (tuple, list)) or len(seed) != len(structure):
            raise InputError(f"seed must be a sequence of {len(structure)} tensors (or None), like the output")
        return [pair for s, r in zip(structure, seed, strict=True) for pair in _match_seed(s, r)]
    if isinstance(structure, Mapping):
        if not isinstance(seed, Mapping):
            raise InputError("seed must be a dict keyed like the model's output")
        unknown = set(seed) - set(structure)
        if unknown:
            raise InputError(f"seed has keys the output lacks: {sorted(unknown)}")
        return [pair for key, s in structure.items() for pair in _match_seed(s, seed.get(key))]
    return []


__all__ = ["RelevanceEngine", "Record", "Backward"]
