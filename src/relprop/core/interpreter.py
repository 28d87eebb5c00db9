"""The graph interpreter: one forward pass that keeps every node's output, then one walk over
the nodes in reverse in which each node's op sends its relevance to its inputs.

Relevance of a node used several times (fan-out) is the sum of what each consumer sends back.
Everything that decides the relevance comes from the composite's strategies and the ops; the
interpreter itself knows no node kind."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from relprop.core.capture import trace_on
from relprop.core.composites import Composite, RuleSpec, resolve_composite
from relprop.core.numerics import largest_gap, same_value, walk_scratch
from relprop.core.ops import INPUT, builtin_op, builtin_types
from relprop.core.ops.base import describe, op_failure, rule_key
from relprop.core.plan import Plan, Step, build_plan, failing_as_refusal, layer_output, load
from relprop.core.rules import Rule
from relprop.core.ruleset import RuleSet
from relprop.core.trace import LeafPolicy, eval_mode, trace
from relprop.errors import (
    FidelityError,
    InputError,
    RelpropError,
    TraceError,
    UnsupportedLayerError,
    first_line,
)

MAX_CAPTURES = 8  # graphs kept per engine on the capture path (one per input shape)


class Values(dict):
    """Every node's output (node -> value) and `parts`: what ops kept from the forward pass for
    their relevance (`Op.record`), node -> parts."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: dict[fx.Node, Any] = {}


@dataclass
class Record:
    """What the forward pass kept: every node's value; `output` as the model returns it."""

    values: Values
    output: Any


@dataclass
class Backward:
    """Relevance at the input and, per report group, the relevance that left the group."""

    input: Tensor
    layer_sums: OrderedDict[str, Tensor] = field(default_factory=OrderedDict)
    layers: dict[str, Tensor] = field(default_factory=dict)  # relevance of requested layers' outputs


class RelevanceEngine:
    """LRP over any traceable module (tensor, tuple, list or dict outputs).

    `rules` maps keys to rule names or `Rule` objects. Keys: module types (also how to support
    custom layers, `{MyLayer: "pass"}`), qualified module names (`"layer4.1.conv2"`), functions
    (`F.interpolate`) and tensor-method names (`"softmax"`). Precedence: a rule by module name,
    then `input_rule` for the layer that sees the input, then rules by type, function or method,
    then the composite's defaults (z+; w⁺ at the input layer). All of these, the split, max-pool,
    attention and constants strategies and `bn` are the fields of a `Composite`: pass one as
    `composite=` or its fields as keywords (a shortcut that builds one; not both).
    """

    def __init__(
        self,
        module: nn.Module,
        split: Any = None,
        identity_skips: bool | None = None,
        rules: Mapping[Any, RuleSpec] | None = None,
        input_rule: RuleSpec | None = None,
        maxpool: Any = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        reference: bool | None = None,
        bn: str | None = None,
        *,
        attention: Any = None,
        constants: Any = None,
        composite: Composite | None = None,
    ) -> None:
        self.composite = resolve_composite(
            composite, split=split, identity_skips=identity_skips, rules=rules, input_rule=input_rule,
            maxpool=maxpool, mean=mean, std=std, reference=reference, bn=bn, attention=attention,
            constants=constants,
        )
        self.module = self.model = module
        self.rules = RuleSet.sort(module, self.composite.rule_map(), *self.composite.normalization())
        self.strategies = self.composite.strategies(self.rules)
        self.bn = self.strategies.bn
        policy = LeafPolicy(lambda m: builtin_op(m) is not None, builtin_types(), tuple(self.rules.types),
                            frozenset(self.rules.names))
        self.cache: dict[Any, Any] = {}  # per-op caches (linear maps), keyed by node
        # keep weight copies between calls (BatchNorm folded into a layer's weights): faster by a
        # product over the weights per call, for a copy of them held as long as the engine
        self.cache_weights = False
        self._policy = policy
        self._captures: dict[tuple, tuple[fx.Graph, Plan, fx.Node]] = {}  # per input shape
        self._fx_error: TraceError | None = None
        try:
            self._use(trace(module, policy))
            self.capture_path = "fx"  # traced once, symbolically: any input shape
        except TraceError as error:  # shape-dependent Python: captured per input shape instead
            self._fx_error, self.capture_path = error, "concrete"
            self.graph, self.plan, self.steps, self.step_of = None, None, [], {}

    def _use(self, graph: fx.Graph, plan: Plan | None = None, input_node: fx.Node | None = None) -> None:
        """Make `graph` the one the engine runs (planned here unless `plan` is given)."""
        if plan is None:
            plan = build_plan(self.module, graph, self.rules, self._policy, self.strategies.canonizers)
            inputs = [step for step in plan.steps if step.op is INPUT]
            if len(inputs) != 1:
                raise InputError(f"the model must take exactly one input tensor (it takes {len(inputs)})")
            input_node = inputs[0].node
        self.graph, self.plan, self.steps, self.step_of = graph, plan, plan.steps, plan.step_of
        self._input_node = input_node

    def prepare(self, x: Tensor) -> None:
        """On the capture path, the graph for inputs shaped like `x` (captured once per shape and
        device); on the fx path there is one graph for all shapes."""
        if self.capture_path == "fx":
            return
        key = (tuple(x.shape), x.device.type)
        if key not in self._captures:
            if len(self._captures) >= MAX_CAPTURES:  # the oldest goes, with its ops' caches
                _, old, _ = self._captures.pop(next(iter(self._captures)))
                for node in old.step_of:
                    self.cache.pop(node, None)
            self._use(trace_on(self.module, self._policy, x.float(), self._fx_error))
            self._captures[key] = (self.graph, self.plan, self._input_node)
        self._use(*self._captures[key])

    def rule_for(self, step: Step) -> Rule:
        """By module name, then `input_rule` at the input layer, then by type, function or
        method, then the composite's defaults."""
        rule = self.rules.by_name(step.node)
        if rule is not None:
            return rule
        if step.op.sees_the_input(step) and self.strategies.input_rule is not None:
            return self.strategies.input_rule
        rule = self.rules.by_kind(step, self.module)
        if rule is not None:
            return rule
        return step.op.default_rule(step, self.strategies)

    # ---------------------------------------------------------------- forward

    @torch.no_grad()
    def forward(self, x: Tensor, keep: str = "backward") -> Record:
        """Run the model in eval semantics and fp32, keeping the node outputs the backward walk
        reads (`keep="backward"`; the others become shape-only stand-ins once the forward pass
        is done with them), only those the fidelity audit compares (`"constants"`), or all."""
        x = x.float()
        self.prepare(x)
        release = self._release_schedule(keep)
        values = Values()
        output = None
        for index, step in enumerate(self.steps):
            if step.node.op == "output":
                output = load(step.node.args[0], values)
            elif step.op is INPUT:
                values[step.node] = x
            else:
                values[step.node], parts = self._run(step, values, x, release.get(index, ()))
                if parts is not None and keep != "constants":  # the audit's pass walks nothing back
                    values.parts[step.node] = parts
            for node in release.get(index, ()):
                values[node] = _stand_in(values[node])
        return Record(values, output)

    def _release_schedule(self, keep: str) -> dict[int, list[fx.Node]]:
        """Step index -> the values no later step of the forward pass needs and the walk (or
        the audit) never reads: released after that step. Nothing where an op does not say
        what it reads (`Op.backward_reads`)."""
        cached = self.plan.release_schedules.get(keep)
        if cached is not None:
            return cached
        schedule: dict[int, list[fx.Node]] = {}
        needed = self._needed(keep)
        if needed is not None:
            last: dict[fx.Node, int] = {}
            for index, step in enumerate(self.steps):
                if step.node.op != "output":
                    last.setdefault(step.node, index)
                for node in step.node.all_input_nodes:
                    last[node] = index
            for node, index in last.items():
                if node not in needed:
                    schedule.setdefault(index, []).append(node)
        self.plan.release_schedules[keep] = schedule
        return schedule

    def _needed(self, keep: str) -> set[fx.Node] | None:
        """The nodes whose values are kept whole (None: all of them)."""
        if keep == "all":
            return None
        needed = {self._input_node, *self.steps[-1].node.all_input_nodes}  # the input, the outputs
        needed.update(step.node for step in self.plan.held_constant())  # what verify audits
        if keep == "constants":
            return needed
        for step in self.steps:
            if not step.op.carries_relevance:
                continue
            reads = step.op.backward_reads(step, self)
            if reads is None:
                return None
            needed.update(reads)
        return needed

    def _run(self, step: Step, values: dict[fx.Node, Any], x: Tensor, dying: Collection[fx.Node]) -> tuple[Any, Any]:
        """The step's output and parts; computed in place where its first argument dies with
        this step (released after it: read by no later step, nor by the walk) and is memory of
        its own."""
        args, kwargs = step.arguments(values)
        try:
            if self._hands_over(step, dying):
                output = step.op.record_in_place(step, args, kwargs)
                if output is not None:
                    return output, None
            return step.op.record(step, args, kwargs, self)
        except RelpropError:
            raise
        except RuntimeError as error:  # shape and dtype mismatches: say where, in one line
            where = step.node.target if step.node.op == "call_module" else step.node.name
            raise InputError(
                f"the model cannot run on inputs of shape {tuple(x.shape)}: at '{where}': {first_line(error)}"
            ) from error
        except Exception as error:  # any other failure: one line naming the node and op
            raise op_failure(step.node, step.module, step.op.name, "compute", error) from error

    def _hands_over(self, step: Step, dying: Collection[fx.Node]) -> bool:
        """Whether the step may compute into its first argument: fresh memory that dies with it
        and that this step alone reads (no view of it taken by another node lives on)."""
        node = step.node
        first = node.args[0] if node.args else None
        return isinstance(first, fx.Node) and first in dying and len(first.users) == 1 \
            and first.op != "placeholder" and self.step_of[first].op.output_is_fresh(self.step_of[first])

    # ---------------------------------------------------------------- backward

    @torch.no_grad()
    def backward(self, record: Record, seed: Any, layer_sums: bool = False,
                 layers: Mapping[str, fx.Node] | None = None) -> Backward:
        """Propagate `seed` (same structure as `record.output`; None = no relevance) to the input;
        with `layer_sums`, also total the relevance that crosses each reported cut; `layers`
        (name -> node, see `layer_nodes`) keeps the relevance of those nodes' outputs."""
        with walk_scratch():
            return self._walk(record, seed, layer_sums, layers)

    def _walk(self, record: Record, seed: Any, layer_sums: bool, layers: Mapping[str, fx.Node] | None) -> Backward:
        keep: dict[fx.Node, list[str]] = {}
        for name, node in (layers or {}).items():
            keep.setdefault(node, []).append(name)
        kept: dict[str, Tensor] = {}
        relevance: dict[fx.Node, Any] = {}
        sums: OrderedDict[str, Tensor] = OrderedDict()
        x = record.values[self._input_node]
        for node, R in _match_seed(self.steps[-1].node.args[0], seed):
            _accumulate(relevance, node, R)
        batch = record.values[self._input_node].shape[0]
        for step in reversed(self.steps):
            R = relevance.pop(step.node, None)
            for name in keep.get(step.node, ()):
                kept[name] = R.clone() if R is not None else _zeros_like(record.values[step.node], x)
            if R is None or not step.op.carries_relevance:
                if step.op is INPUT and R is not None:
                    relevance[step.node] = R
                continue
            with failing_as_refusal(step, "propagate relevance through"):
                for parent, R_in in step.op.relevance(step, record.values, R, self):
                    if layer_sums and step.group is not None and self.step_of[parent].group != step.group:
                        total = sum(_per_sample(r, batch) for r in _slots(R_in) if r is not None)
                        sums[step.group] = sums[step.group] + total if step.group in sums else total
                    _accumulate(relevance, parent, R_in)
        return Backward(relevance.get(self._input_node, torch.zeros_like(x)), sums,
                        {name: kept[name] for name in (layers or {})})

    def layer_nodes(self, names: Iterable[str]) -> dict[str, fx.Node]:
        """The graph nodes whose outputs are the named modules' outputs (for `backward(layers=)`)."""
        if self.plan is None:
            raise InputError("this model is captured per input shape: call forward(x) before layer_nodes")
        return {name: layer_output(self.plan, name) for name in names}

    # ---------------------------------------------------------------- fidelity

    @torch.no_grad()
    def verify(self, x: Tensor, record: Record) -> None:
        """Raise FidelityError unless the model's own forward (eval mode, its own dtype, its
        hooks) gives the output the engine computed, and every value the walk holds constant is
        independent of the input (`_audit_constants`): otherwise the relevance would explain a
        different function, or drop a branch, however well it conserves."""
        dtype = next((p.dtype for p in self.module.parameters() if p.is_floating_point()), torch.float32)
        tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
        try:
            with eval_mode(self.module):
                reference = self.module(x.to(dtype))
        except RelpropError:
            raise
        except Exception as error:  # the model's own forward: one line, not its traceback
            raise InputError(f"the model's own forward fails on inputs of shape {tuple(x.shape)}: "
                             f"{first_line(error)}") from error
        gap = largest_gap(record.output, reference, tolerance)
        if gap is None:
            self._audit_constants(x, record)
            return
        raise FidelityError(
            f"the model's own output differs from what relprop computes for it (max |Δ| = {gap:.3g}, "
            f"{self._first_divergence(x, dtype, tolerance)}), so its relevance would explain "
            "another function; give that module a rule (rules={ItsType: rule}) or explain a model "
            "without hooks or per-instance forwards there"
        )

    def _audit_constants(self, x: Tensor, record: Record) -> None:
        """Every value the walk holds fixed (`Plan.held_constant`: constants, parameters, shapes,
        modules applied to constant tables) must be independent of the input: the forward pass
        is run again on another input of the same shape, and each must come out the same.
        A dependence the graph does not show (module state, a global, an op taken for a shape)
        would otherwise drop its branch's relevance while the totals still conserve."""
        generator = torch.Generator(device=x.device).manual_seed(0)
        scale = float(x.float().std()) if x.numel() > 1 else 1.0
        other = torch.randn(x.shape, generator=generator, device=x.device) * (scale if scale > 0 else 1.0)
        values = self.forward(other + x.float().mean(), keep="constants").values
        changed = [step for step in self.plan.held_constant()
                   if not same_value(record.values[step.node], values[step.node])]
        if changed:  # rare: tell input dependence from values that differ on every run (torch.empty)
            again = self.forward(x, keep="constants").values
            changed = [step for step in changed if same_value(record.values[step.node], again[step.node])]
        if changed:
            node, module = changed[0].node, changed[0].module
            raise FidelityError(
                f"relprop holds {describe(node, module)} fixed as independent of the input, but its value "
                "changes with the input, so the relevance through it would be lost while the totals still "
                f"conserve; give it a rule (rules={{{rule_key(node, module)}: rule}}) or pass what it depends on "
                "as an argument instead of module state"
            )

    def _first_divergence(self, x: Tensor, dtype: torch.dtype, tolerance: float) -> str:
        """Re-run the model with hooks on every leaf module and name the first that disagrees."""
        outputs: dict[int, list[Any]] = {}
        record = self.forward(x, keep="all")  # every leaf's output, none released
        leaves = [step for step in self.steps if step.node.op == "call_module"]
        modules = {id(step.module): step.module for step in leaves}
        handles = [m.register_forward_hook(lambda mod, args, out: outputs.setdefault(id(mod), []).append(out))
                   for m in modules.values()]
        try:
            with eval_mode(self.module):
                self.module(x.to(dtype))
        finally:
            for handle in handles:
                handle.remove()
        calls: dict[int, int] = {}
        for step in leaves:
            index = calls[id(step.module)] = calls.get(id(step.module), -1) + 1
            seen = outputs.get(id(step.module), [])
            if index < len(seen) and largest_gap(record.values[step.node], seen[index], tolerance) is not None:
                return f"first at module '{step.node.target}' ({type(step.module).__name__})"
        return "every leaf module agrees; the difference arises between them"


def _stand_in(value: Any) -> Any:
    """A released tensor's shape-only stand-in (on the meta device: its shape, dtype and
    size, and an error, not a number, if anything reads its values)."""
    return torch.empty(value.shape, dtype=value.dtype, device="meta") if isinstance(value, Tensor) else value


def _zeros_like(value: Tensor, like: Tensor) -> Tensor:
    """Zeros of a value's shape on the input's device (the value may be a stand-in)."""
    return torch.zeros(value.shape, dtype=value.dtype, device=like.device)


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


def _per_sample(R: Tensor, batch: int) -> Tensor:
    """Per-sample totals of a relevance tensor whose leading dimension is the batch, or the batch
    folded with another dimension batch-major (TNT's pixel tokens, windows: B·N rows)."""
    if R.dim() == 0 or R.shape[0] % batch:
        raise UnsupportedLayerError(
            f"a reported cut holds a value of shape {tuple(R.shape)} whose rows are not the batch's "
            f"({batch}); ask for no layer sums (return_layer_sums=False) on this model")
    return R.reshape(batch, -1).sum(1)


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


__all__ = ["RelevanceEngine", "Record", "Backward", "Values"]
