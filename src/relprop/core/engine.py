"""The graph interpreter: one forward pass that keeps every node's output, then one walk
over the nodes in reverse that applies one rule per node kind.

Relevance of a node used several times (fan-out) is the sum of what each consumer sends
back. Residual adds are where relevance is split between skip and branch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from relprop.core import graph as g
from relprop.core.attention import (
    MultiheadParts,
    WindowParts,
    attention_module_forward,
    bilinear_relevance,
    sdpa_core,
    softmax_relevance,
)
from relprop.core.composites import BN_MODES, MAXPOOL_RULES, Composite, RuleSpec, resolve_composite
from relprop.core.rules import (
    LINEAR_TYPES,
    BatchNormStats,
    LayerNormParams,
    LinearOp,
    PassRule,
    ProportionalRule,
    ReferenceZPlusRule,
    Rule,
    WPlusRule,
    ZPlusRule,
    as_linear_op,
    fold_batchnorm,
    functional_linear_op,
    get_rule,
    proportional,
    vjp,
)
from relprop.core.splitting import Splitter
from relprop.errors import FidelityError, InputError, UnsupportedLayerError


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
    layers: dict[str, Tensor] = field(default_factory=dict)  # relevance of requested layers' outputs


@dataclass(frozen=True)
class RuleSet:
    """The user's rules by key kind: module names, module types, functions, tensor methods."""

    names: dict[str, Rule] = field(default_factory=dict)
    types: dict[type, Rule] = field(default_factory=dict)
    functions: dict[Any, Rule] = field(default_factory=dict)
    methods: dict[str, Rule] = field(default_factory=dict)

    def all(self) -> list[Rule]:
        return [*self.names.values(), *self.types.values(), *self.functions.values(), *self.methods.values()]

    def user_rules(self) -> g.UserRules:
        return g.UserRules(tuple(self.types), frozenset(self.names), frozenset(self.functions),
                           frozenset(self.methods))

    def by_kind(self, step: g.Step, model: nn.Module) -> Rule | None:
        """A rule by type (of the module, of the function's module twin, or of the module a
        functional call sits in), function or method."""
        node = step.node
        if node.op == "call_method":
            return self.methods.get(node.target)
        if node.op == "call_function" and node.target in self.functions:
            return self.functions[node.target]
        candidates: list[type] = []
        if step.module is not None:
            candidates.append(type(step.module))
        elif node.op == "call_function" and node.target in g.LINEAR_FUNCTIONS:
            candidates.append(g.LINEAR_FUNCTIONS[node.target])
            path = g.module_path(node)
            if path:
                candidates.append(type(model.get_submodule(path)))
        return self.by_type(*candidates)

    def by_type(self, *candidates: type) -> Rule | None:
        """The first type rule whose key is one of `candidates` or a base class of one."""
        for layer_type, rule in self.types.items():
            if any(issubclass(candidate, layer_type) for candidate in candidates):
                return rule
        return None


def _sort_rules(model: nn.Module, rules: Mapping[Any, RuleSpec], mean: list[float] | None,
                std: list[float] | None) -> RuleSet:
    """A string key is a module name of this model, else a tensor method; other keys are module
    types or functions."""
    module_names = {name for name, _ in model.named_modules() if name}
    ruleset = RuleSet()
    for key, spec in rules.items():
        rule = get_rule(spec, mean, std)
        if isinstance(key, type):
            ruleset.types[key] = rule
        elif isinstance(key, str) and key in module_names:
            ruleset.names[key] = rule
        elif isinstance(key, str) and callable(getattr(Tensor, key, None)):
            ruleset.methods[key] = rule
        elif callable(key) and not isinstance(key, str):
            ruleset.functions[key] = rule
        else:
            raise ValueError(f"rule key {key!r} is neither a module type, a module name of this model, "
                             "a function nor a tensor method name")
    return ruleset
# Rules whose result does not change when BatchNorm is folded into the layer before it (for
# positive BN scales): the paper's composite. Every other rule divides by a z that BN changes.
_BN_INVARIANT_RULES = (ZPlusRule, WPlusRule, PassRule, ProportionalRule)  # (pooling: no BatchNorm)


class RelevanceEngine:
    """LRP over any traceable module (tensor, tuple, list or dict outputs).

    `rules` maps keys to rule names or `Rule` objects. Keys: module types (also how to support
    custom layers, `{MyLayer: "pass"}`), qualified module names (`"layer4.1.conv2"`), functions
    (`F.interpolate`) and tensor-method names (`"softmax"`). Precedence: a rule by module name,
    then `input_rule` for the layer that sees the input, then rules by type, function or method,
    then the defaults (z+; w⁺ at the input layer). `bn="fold"` lets the rule of a layer next to
    a BatchNorm see the effective (folded) layer; `"pass"` passes relevance through BatchNorm.
    All of these are the fields of a `Composite`: pass one as `composite=` or its fields as
    keywords (a shortcut that builds one; not both).
    """

    def __init__(
        self,
        module: nn.Module,
        split: str | None = None,
        identity_skips: bool | None = None,
        rules: Mapping[Any, RuleSpec] | None = None,
        input_rule: RuleSpec | None = None,
        maxpool: str | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        reference: bool | None = None,
        bn: str | None = None,
        *,
        attention: str | None = None,
        constants: str | None = None,
        composite: Composite | None = None,
    ) -> None:
        composite = resolve_composite(
            composite, split=split, identity_skips=identity_skips, rules=rules, input_rule=input_rule,
            maxpool=maxpool, mean=mean, std=std, reference=reference, bn=bn, attention=attention,
            constants=constants,
        )
        self.composite = composite
        self.module = module
        self.reference = reference = composite.reference
        self.maxpool = composite.maxpool
        self.splitter = Splitter(composite.split, composite.identity_skips, reference=reference)
        self.attention = composite.attention
        self.constants = composite.constants
        mean, std = _as_list(composite.mean), _as_list(composite.std)
        self._rules = _sort_rules(module, composite.rule_map(), mean, std)
        if reference:
            self._default_rule: Rule = ReferenceZPlusRule()
            self._default_input_rule: Rule = ReferenceZPlusRule(ones_input=True)
            self._input_rule: Rule | None = None
        else:
            self._default_rule = ZPlusRule()
            self._default_input_rule = WPlusRule()
            self._input_rule = None if composite.input_rule is None else get_rule(composite.input_rule, mean, std)
        self.bn = self._resolve_bn(composite.bn)
        user = self._rules.user_rules()
        self.graph = g.trace(module, user)
        self.steps = g.build_steps(module, self.graph, user, fold_batchnorm=self.bn == "fold")
        inputs = [step for step in self.steps if step.kind == g.INPUT]
        if len(inputs) != 1:
            raise InputError(f"the model must take exactly one input tensor (it takes {len(inputs)})")
        self._input_step = inputs[0]
        self._step_of = {step.node: step for step in self.steps}
        self._ops: dict[fx.Node, tuple[tuple, LinearOp]] = {}
        self._handlers = self._handler_table()

    def _resolve_bn(self, bn: str | None) -> str:
        """None: "pass" for the paper's composite (z+, w⁺: unchanged by folding), "fold" as soon
        as any rule divides by a z that BatchNorm changes (ε, γ, αβ, zB, flat, w², ...)."""
        if bn is not None:  # validated by the Composite
            return bn
        rules = [*self._rules.all(), self._input_rule]
        invariant = all(rule is None or type(rule) in _BN_INVARIANT_RULES for rule in rules)
        return "pass" if invariant or self.reference else "fold"

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
                values[node] = x if step.kind == g.INPUT else node.args[0]
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
            if step.kind == g.ATTENTION:
                return attention_module_forward(step.module, args, kwargs)
            return _module_forward(step.module, args, kwargs)
        if node.op == "call_function":
            if node.target in g.DROPOUT_FUNCTIONS:
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
    def backward(self, record: Record, seed: Any, layer_sums: bool = False,
                 layers: Mapping[str, fx.Node] | None = None) -> Backward:
        """Propagate `seed` (same structure as `record.output`; None = no relevance) to the input;
        with `layer_sums`, also total the relevance that crosses each reported cut; `layers`
        (name -> node, see `layer_nodes`) keeps the relevance of those nodes' outputs."""
        keep: dict[fx.Node, list[str]] = {}
        for name, node in (layers or {}).items():
            keep.setdefault(node, []).append(name)
        kept: dict[str, Tensor] = {}
        relevance: dict[fx.Node, Tensor] = {}
        sums: OrderedDict[str, Tensor] = OrderedDict()
        output_step = self.steps[-1]
        for node, R in _match_seed(output_step.node.args[0], seed):
            _accumulate(relevance, node, R)
        for step in reversed(self.steps):
            R = relevance.pop(step.node, None)
            for name in keep.get(step.node, ()):
                kept[name] = R.clone() if R is not None else torch.zeros_like(record.values[step.node])
            if R is None or step.kind in (g.INPUT, g.CONSTANT, g.OUTPUT):
                if step.kind == g.INPUT and R is not None:
                    relevance[step.node] = R
                continue
            for parent, R_in in self._propagate(step, record.values, R):
                if layer_sums and step.group is not None and self._group(parent) != step.group:
                    total = sum(r.reshape(r.shape[0], -1).sum(1) for r in _slots(R_in) if r is not None)
                    sums[step.group] = sums[step.group] + total if step.group in sums else total
                _accumulate(relevance, parent, R_in)
        x = record.values[self._input_step.node]
        R_input = relevance.get(self._input_step.node, torch.zeros_like(x))
        return Backward(R_input, sums, {name: kept[name] for name in (layers or {})})

    def layer_nodes(self, names: Iterable[str]) -> dict[str, fx.Node]:
        """The graph nodes whose outputs are the named modules' outputs (for `backward(layers=)`)."""
        return {name: g.layer_output(self.steps, name) for name in names}

    # ---------------------------------------------------------------- fidelity

    @torch.no_grad()
    def verify(self, x: Tensor, record: Record) -> None:
        """Raise FidelityError unless the model's own forward (eval mode, its own dtype, its
        hooks) gives the output the engine computed: otherwise the relevance would explain a
        different function, however well it conserves."""
        dtype = next((p.dtype for p in self.module.parameters() if p.is_floating_point()), torch.float32)
        tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
        with g.eval_mode(self.module):
            reference = self.module(x.to(dtype))
        gap = _largest_gap(record.output, reference, tolerance)
        if gap is None:
            return
        raise FidelityError(
            f"the model's own output differs from what relprop computes for it (max |Δ| = {gap:.3g}, "
            f"{self._first_divergence(x, dtype, record, tolerance)}), so its relevance would explain "
            "another function; give that module a rule (rules={ItsType: rule}) or explain a model "
            "without hooks or per-instance forwards there"
        )

    def _first_divergence(self, x: Tensor, dtype: torch.dtype, record: Record, tolerance: float) -> str:
        """Re-run the model with hooks on every leaf module and name the first that disagrees."""
        outputs: dict[int, list[Any]] = {}
        leaves = [step for step in self.steps if step.node.op == "call_module"]
        modules = {id(step.module): step.module for step in leaves}
        handles = [m.register_forward_hook(lambda mod, args, out: outputs.setdefault(id(mod), []).append(out))
                   for m in modules.values()]
        try:
            with g.eval_mode(self.module):
                self.module(x.to(dtype))
        finally:
            for handle in handles:
                handle.remove()
        calls: dict[int, int] = {}
        for step in leaves:
            index = calls[id(step.module)] = calls.get(id(step.module), -1) + 1
            seen = outputs.get(id(step.module), [])
            if index < len(seen) and _largest_gap(record.values[step.node], seen[index], tolerance) is not None:
                return f"first at module '{step.node.target}' ({type(step.module).__name__})"
        return "every leaf module agrees; the difference arises between them"

    def _group(self, node: fx.Node) -> str | None:
        return self._step_of[node].group

    def rule_for(self, step: g.Step) -> Rule:
        """By module name, then `input_rule` at the input layer, then by type, function or
        method, then the defaults."""
        node = step.node
        path = node.target if node.op == "call_module" else g.module_path(node)
        if path in self._rules.names:
            return self._rules.names[path]
        if step.is_input_layer and self._input_rule is not None:
            return self._input_rule
        rule = self._rules.by_kind(step, self.module)
        if rule is not None:
            return rule
        if step.kind == g.LINEAR:
            return self._default_input_rule if step.is_input_layer else self._default_rule
        if step.kind == g.CUSTOM:
            raise AssertionError(f"no rule for custom node {node.name}")
        return PassRule()

    def _propagate(self, step: g.Step, values: dict[fx.Node, Any], R: Tensor) -> list[tuple[fx.Node, Tensor]]:
        """Relevance of the step's parents, by the handler of its kind."""
        return self._handlers[step.kind](step, values, R)

    def _handler_table(self) -> dict[g.Kind, Callable[[g.Step, dict[fx.Node, Any], Tensor], list[tuple[fx.Node, Tensor]]]]:
        return {
            g.LINEAR: lambda step, values, R: [(step.inputs[0], self._linear(step, values, R))],
            g.CUSTOM: self._custom,
            g.PASS: self._pass,
            g.ADD: self._add,
            g.SCALE: self._scale,
            g.CAT: lambda step, values, R: self._cat(step.node, values, R),
            g.POOL: self._proportional,
            g.MAXPOOL: self._proportional,
            g.ROUTE: self._route,
            g.META: self._meta,
            g.MATMUL: self._matmul,
            g.SOFTMAX: self._softmax,
            g.ATTENTION: self._attention,
        }

    # ------------------------------------------------------------ attention

    def _matmul(self, step: g.Step, values: dict[fx.Node, Any], R: Tensor) -> list[tuple[fx.Node, Tensor]]:
        """A product of two tensors: the uniform bilinear rule (half to each factor), the ε-rule
        on the input-dependent factor when the other is constant; `A @ V` with attention weights
        A held constant under the "cp" attention rule."""
        first, second = step.node.args[0], step.node.args[1]
        a, b = values[first], values[second]
        dependent = [arg in step.inputs for arg in (first, second)]
        if dependent == [True, True]:
            share = 0.0 if step.gate == 0 and self.attention == "cp" else 0.5
        else:
            share = 1.0 if dependent[0] else 0.0
        product = torch.bmm if step.node.target in (torch.bmm, "bmm") else torch.matmul
        R_a, R_b = bilinear_relevance(product, a, b, R, share_a=share)
        return [(arg, R_arg) for arg, R_arg, keep, part in ((first, R_a, dependent[0], share),
                                                            (second, R_b, dependent[1], 1 - share))
                if keep and part > 0]

    def _softmax(self, step: g.Step, values: dict[fx.Node, Any], R: Tensor) -> list[tuple[fx.Node, Tensor]]:
        """Softmax inside attention: AttnLRP's rule (its input is the attention logits)."""
        parent = step.inputs[0]
        return [(parent, softmax_relevance(values[parent], values[step.node], R, _softmax_dim(step)))]

    def _attention(self, step: g.Step, values: dict[fx.Node, Any], R: Tensor | list[Tensor]
                   ) -> list[tuple[fx.Node, Tensor]]:
        node = step.node
        if step.module is None:  # F.scaled_dot_product_attention
            args, kwargs = _load(node.args, values), _load(node.kwargs, values)
            q, k, v, core = sdpa_core(*args, **kwargs)
            return _to_query_key_value(step, core.relevance(q, k, v, R, self.attention))
        R = R[0] if isinstance(R, list) else R
        rule = self._inner_linear_rule()
        if isinstance(step.module, nn.MultiheadAttention):
            return self._multihead_attention(step, values, R, rule)
        return self._window_attention(step, values, R, rule)

    def _inner_linear_rule(self) -> Rule:
        """The rule of the projections inside an attention module: the user's rule for
        nn.Linear if any, else the default."""
        rule = self._rules.by_type(nn.Linear)
        return rule if rule is not None else self._default_rule

    def _multihead_attention(self, step: g.Step, values: dict[fx.Node, Any], R: Tensor, rule: Rule
                             ) -> list[tuple[fx.Node, Tensor]]:
        node = step.node
        parts = MultiheadParts.of(step.module, *_load(node.args, values), **_load(node.kwargs, values))
        _check_recomputed(parts.output(), values[node][0], node)
        return _to_query_key_value(step, parts.relevance(R, rule, self.attention))

    def _window_attention(self, step: g.Step, values: dict[fx.Node, Any], R: Tensor, rule: Rule
                          ) -> list[tuple[fx.Node, Tensor]]:
        node = step.node
        x = values[node.args[0]]
        parts = WindowParts.of(step.module, x)
        _check_recomputed(parts.output(), values[node], node)
        return [(node.args[0], parts.relevance(x, R, rule, self.attention, vjp))]

    def _pass(self, step: g.Step, values: dict[fx.Node, Any], R: Tensor) -> list[tuple[fx.Node, Tensor]]:
        """Identity, unless the user named a rule for this layer (by name or type)."""
        parent = step.inputs[0]
        node = step.node
        path = node.target if node.op == "call_module" else None
        rule = self._rules.names.get(path) if path else None
        layer = step.module
        if rule is None and step.module is not None:
            rule = self._rules.by_kind(step, self.module)
        elif rule is None and node.op == "call_function" and node.target is F.layer_norm:
            rule, layer = self._functional_layer_norm_rule(step, values)
        if rule is None or step.folded_into is not None:
            return [(parent, R.reshape(values[parent].shape))]
        return [(parent, rule.relevance(layer, values[parent], R))]

    def _functional_layer_norm_rule(self, step: g.Step, values: dict[fx.Node, Any]) -> tuple[Rule | None, Any]:
        """A rule for nn.LayerNorm (or the module type the call sits in, e.g. timm's LayerNorm,
        a subclass with its own forward) also covers `F.layer_norm` calls."""
        path = g.module_path(step.node)
        candidates = [nn.LayerNorm, *([type(self.module.get_submodule(path))] if path else [])]
        rule = self._rules.by_type(*candidates)
        if rule is None:
            return None, None
        bound = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"),
                         _load(step.node.args, values), strict=False)) | _load(step.node.kwargs, values)
        return rule, LayerNormParams(tuple(bound["normalized_shape"]), bound.get("weight"), bound.get("bias"),
                                     float(bound.get("eps", 1e-5)))

    def _custom(self, step: g.Step, values: dict[fx.Node, Any], R: Tensor) -> list[tuple[fx.Node, Tensor]]:
        parent = step.inputs[0]
        layer = step.module if step.module is not None else self._as_function_of_first_input(step, values)
        return [(parent, self.rule_for(step).relevance(layer, values[parent], R))]

    def _scale(self, step: g.Step, values: dict[fx.Node, Any], R: Tensor) -> list[tuple[fx.Node, Tensor]]:
        """x * constant, or x * gate(x): all relevance stays with x."""
        parents = g.relevance_parents(step)
        if len(parents) != 1:
            raise UnsupportedLayerError(
                f"'{step.node.name}'{g.in_module(step.node)} multiplies two unrelated input-dependent "
                "tensors; relprop has no rule for that"
            )
        return [(parents[0], R.sum_to_size(values[parents[0]].shape))]

    def _proportional(self, step: g.Step, values: dict[fx.Node, Any], R: Tensor) -> list[tuple[fx.Node, Tensor]]:
        """Pooling and upsampling: the z-rule of a positive linear map."""
        parent = step.inputs[0]
        fn = self._as_function_of_first_input(step, values)
        return [(parent, proportional(fn, values[parent], R, 1e-5 if self.reference else 0.0))]

    def _route(self, step: g.Step, values: dict[fx.Node, Any], R: Tensor | list[Tensor]
               ) -> list[tuple[fx.Node, Tensor | list[Tensor]]]:
        """Reshapes, permutes, slicing, padding, chunk/split: relevance follows the elements. An
        element taken from a tuple (`x.chunk(2)[1]`) sends its relevance to that slot of the
        tuple's relevance; the chunk then sends all slots back at once."""
        parent = step.inputs[0]
        a = values[parent]
        if isinstance(a, (tuple, list)):
            index = step.node.args[1]
            slots = [torch.zeros_like(t) if isinstance(t, Tensor) else None for t in a]
            slots[index] = R
            return [(parent, slots)]
        return [(parent, vjp(self._as_function_of_first_input(step, values), a, R))]

    @staticmethod
    def _meta(step: g.Step, values: dict[fx.Node, Any], R: Tensor) -> list[tuple[fx.Node, Tensor]]:
        if isinstance(values[step.node], Tensor):
            raise UnsupportedLayerError(f"no relevance rule for node '{step.node.name}' ({step.node.target})")
        return []

    def _linear(self, step: g.Step, values: dict[fx.Node, Any], R: Tensor) -> Tensor:
        """The layer's rule on its effective op; with a BatchNorm folded in before it, the op
        reads the BatchNorm's input, and the relevance passes through the BatchNorm unchanged."""
        rule = self.rule_for(step)
        source = step.fold_before if step.fold_before is not None else step.inputs[0]
        op = self._linear_op(step, values)
        if isinstance(rule, ZPlusRule) and self._step_of[source].nonnegative:
            return rule.relevance(op, values[source], R, nonnegative=True)
        return rule.relevance(op, values[source], R)

    def _linear_op(self, step: g.Step, values: dict[fx.Node, Any]) -> LinearOp:
        """The step's linear map with its adjacent BatchNorms folded in; cached per parameter
        version for modules (w⁺ and folding are then computed once, not per image)."""
        node = step.node
        bns = [self._step_of[n].module for n in (step.fold_before, step.fold_after) if n is not None]
        # Cacheable: everything comes from modules' tensors (a functional call's weight is computed
        # in the forward pass) and nothing from the input's shape (folding before a padded conv).
        cacheable = step.module is not None and step.fold_before is None and None not in bns
        key = None
        if cacheable:
            sources = [step.module, *bns]
            key = tuple((t._version, t.data_ptr(), t.device) for m in sources for t in (*m.parameters(), *m.buffers()))
            cached = self._ops.get(node)
            if cached is not None and cached[0] == key:
                return cached[1]
        if node.op == "call_module":
            op = as_linear_op(step.module)
        else:
            op = functional_linear_op(node.target, _load(node.args, values), _load(node.kwargs, values))
        if step.fold_before is not None:
            bn = self._step_of[step.fold_before]
            op = fold_batchnorm(op, self._bn_stats(bn, values), before=True,
                                input_shape=values[bn.node].shape)
        if step.fold_after is not None:
            op = fold_batchnorm(op, self._bn_stats(self._step_of[step.fold_after], values))
        if key is not None:
            self._ops[node] = (key, op)
        return op

    @staticmethod
    def _bn_stats(step: g.Step, values: dict[fx.Node, Any]) -> BatchNormStats:
        if step.module is not None:
            return BatchNormStats.of(step.module)
        bound = g.batch_norm_arguments(_load(step.node.args, values), _load(step.node.kwargs, values))
        return BatchNormStats(bound["running_mean"], bound["running_var"], bound.get("weight"),
                              bound.get("bias"), float(bound.get("eps", 1e-5)))

    def _add(self, step: g.Step, values: dict[fx.Node, Any], R: Tensor) -> list[tuple[fx.Node, Tensor]]:
        first, second = step.node.args[0], step.node.args[1]
        dependent = [arg for arg in (first, second) if isinstance(arg, fx.Node) and arg in step.inputs]
        if len(dependent) == 1 and self.constants == "input":  # x + constant: x keeps it all
            parent = dependent[0]
            return [(parent, R.sum_to_size(values[parent].shape))]
        if len(dependent) == 1:  # the constant takes its share of the split (a leak)
            a, b = (_value(first, values), _value(second, values))
            R_a, R_b = self.splitter(R, *torch.broadcast_tensors(a, b), None)
            parent, R_parent = (first, R_a) if first is dependent[0] else (second, R_b)
            return [(parent, R_parent.sum_to_size(values[parent].shape))]
        a, b = values[first], values[second]
        R_a, R_b = self.splitter(R, a, b, step.skip)
        return [(first, R_a.sum_to_size(a.shape)), (second, R_b.sum_to_size(b.shape))]

    def _cat(self, node: fx.Node, values: dict[fx.Node, Any], R: Tensor) -> list[tuple[fx.Node, Tensor]]:
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        sizes = [values[t].shape[dim] if isinstance(t, fx.Node) else t.shape[dim] for t in tensors]
        pieces = torch.split(R, sizes, dim=dim)
        step = self._step_of[node]
        kept = [(t, piece) for t, piece in zip(tensors, pieces, strict=True)
                if isinstance(t, fx.Node) and (t in step.inputs or self.constants == "leak")]
        if self.constants == "leak" or len(kept) == len(tensors):
            return kept
        if dim % R.dim() == 0:
            raise UnsupportedLayerError(
                f"'{node.name}'{g.in_module(node)} concatenates a constant along the batch dimension; "
                "its relevance has no sample to go to: use constants='leak'")
        return [(t, piece) for t, piece in zip([t for t, _ in kept], _absorb(R, [p for _, p in kept]), strict=True)]

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
        dims = args[0].dim() - 2
        if self.maxpool == "wta":
            max_pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
            return lambda t: max_pool(t, kernel, stride, padding, dilation, ceil_mode)
        if any(d != 1 for d in _as_tuple(dilation)):
            raise UnsupportedLayerError(
                f"max pooling with dilation {dilation} at '{step.node.name}': use maxpool='wta'"
            )
        # the same windows, summed: the z-rule's per-window divisor cancels, so an average serves
        avg_pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
        return lambda t: avg_pool(t, kernel, stride, padding, ceil_mode, True)


def _value(arg: Any, values: dict[fx.Node, Any]) -> Tensor:
    value = values[arg] if isinstance(arg, fx.Node) else arg
    return value if isinstance(value, Tensor) else torch.tensor(float(value))


def _absorb(R: Tensor, pieces: list[Tensor]) -> list[Tensor]:
    """The relevance of a cat's constant operands (ViT's class token) given to its
    input-dependent ones: per sample, their relevance scaled so that the total is R's (the map
    keeps its shape); where that scale is not positive and finite, added in proportion to |R|."""
    def total(t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], -1).sum(1)

    target = total(R)
    kept = sum(total(p) for p in pieces)
    scale = target / kept
    usable = torch.isfinite(scale) & (scale > 0)
    magnitude = sum(total(p.abs()) for p in pieces)
    out = []
    for piece in pieces:
        shape = (-1, *([1] * (piece.dim() - 1)))
        scaled = piece * torch.where(usable, scale, torch.ones_like(scale)).reshape(shape)
        spread = piece.abs() * torch.nan_to_num((target - kept) / magnitude).reshape(shape)
        out.append(torch.where(usable.reshape(shape), scaled, piece + spread))
    return out


def _to_query_key_value(step: g.Step, parts: Sequence[Tensor]) -> list[tuple[fx.Node, Tensor]]:
    """An attention call's relevance for its query, key and value arguments, for those that
    depend on the input and received any."""
    return [(arg, R_arg) for arg, R_arg in zip(step.node.args[:3], parts, strict=True)
            if isinstance(arg, fx.Node) and arg in step.inputs and bool(R_arg.any())]


def _softmax_dim(step: g.Step) -> int:
    node = step.node
    if step.module is not None:
        dim = step.module.dim
    else:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if not isinstance(dim, int):
        raise UnsupportedLayerError(f"softmax at '{node.name}' without an explicit integer dim is not supported")
    return dim


def _check_recomputed(ours: Tensor, recorded: Tensor, node: fx.Node) -> None:
    """The attention module recomputed from its parts must give what the forward recorded."""
    gap = _largest_gap(ours, recorded, 1e-4)
    if gap is not None:
        raise FidelityError(
            f"relprop's decomposition of '{node.target}' differs from its output (max |Δ| = {gap:.3g}); "
            "give that module a rule (rules={ItsType: rule})"
        )


def _as_list(values: tuple[float, ...] | None) -> list[float] | None:
    return None if values is None else list(values)


def _as_tuple(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _maxpool_geometry(kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    return kernel_size, stride if stride not in (None, []) else kernel_size, padding, dilation, ceil_mode


def _module_forward(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Eval-mode, fp32 forward of leaf modules, without touching the module itself."""
    if isinstance(module, LINEAR_TYPES) and g.builtin_kind(module) == g.LINEAR:
        op = as_linear_op(module)
        if args[1:] or kwargs:  # ConvTranspose's output_size: a shape-dependent output padding
            raise UnsupportedLayerError(f"{type(module).__name__} called with output_size is not supported")
        return op.forward(args[0], op.weight, op.bias)
    if isinstance(module, g.BATCHNORM_MODULES):
        return _batch_norm(module, args[0])
    if isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)):
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


def _largest_gap(computed: Any, reference: Any, tolerance: float) -> float | None:
    """The largest absolute difference between two outputs of the same structure, if any
    tensor differs by more than `tolerance` relative to its scale; None when they agree."""
    ours, _ = tree_flatten(computed)
    theirs, _ = tree_flatten(reference)
    if len(ours) != len(theirs):
        return float("inf")
    worst = None
    for a, b in zip(ours, theirs, strict=True):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or not b.is_floating_point():
            continue
        if a.shape != b.shape:
            return float("inf")
        b = b.detach().to(device=a.device, dtype=torch.float32)
        gap = float((a - b).abs().max()) if a.numel() else 0.0
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        if not gap <= tolerance * scale:  # NaN counts as a difference
            worst = gap if worst is None else max(worst, gap)
    return worst


def _load(arg: Any, values: dict[fx.Node, Any]) -> Any:
    return fx.node.map_arg(arg, lambda n: values[n])


def _accumulate(relevance: dict[fx.Node, Any], node: fx.Node, R: Tensor | list[Tensor | None]) -> None:
    """Fan-in: add in place (per slot for tuple-valued nodes such as chunk). Every tensor held
    here belongs to the backward pass (seeds are copied on entry), so nothing the caller holds
    is changed."""
    if node not in relevance:
        relevance[node] = R
    elif isinstance(R, list):
        for held, new in zip(relevance[node], R, strict=True):
            if held is not None:
                held.add_(new)
    else:
        relevance[node].add_(R)


def _slots(R: Tensor | list[Tensor]) -> list[Tensor]:
    """The relevance tensors of a node: one, or one per element of a tuple-valued node."""
    return R if isinstance(R, list) else [R]


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


__all__ = ["RelevanceEngine", "Record", "Backward", "BN_MODES", "MAXPOOL_RULES", "RuleSpec"]
