"""The plan: every graph node with the op that claimed it, in execution order, and the graph
facts the ops need (which inputs depend on the image, operand roles, non-negativity, report
groups). Planned once, when an explainer is built, so an unsupported layer is reported before
any image is processed."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from relprop.core.canonize import Canonizer
from relprop.core.ops import (
    CONSTANT,
    CUSTOM,
    INPUT,
    OPS,
    OUTPUT,
    UNSUPPORTED,
    builtin_op,
    builtin_types,
)
from relprop.core.ops.base import Op, describe, op_failure, rule_key, unsupported
from relprop.core.ops.linear import Linear
from relprop.core.ops.meta import Meta
from relprop.core.ruleset import RuleSet
from relprop.core.trace import LeafPolicy, module_path
from relprop.errors import ConfigError, OpFailure, RelpropError, UnsupportedLayerError, first_line


@dataclass
class Step:
    """One graph node, the op that claimed it, its input-dependent arguments, and the op's own
    facts about it (`info`: operand roles, folds, a refusal)."""

    node: fx.Node
    op: Op
    inputs: list[fx.Node] = field(default_factory=list)
    info: Any = None
    module: nn.Module | None = None
    group: str | None = None  # the report entry (top-level layer or residual block) it belongs to
    nonnegative: bool = False  # the output is >= 0 by construction (after a ReLU, pooled...)

    @property
    def is_input(self) -> bool:
        return self.op is INPUT

    def arguments(self, values: dict[fx.Node, Any]) -> tuple[tuple, dict]:
        """The call's positional and keyword arguments with this forward pass's values."""
        return load(self.node.args, values), load(self.node.kwargs, values)

    def operand(self, arg: Any, values: dict[fx.Node, Any]) -> Tensor:
        """An argument as a tensor (a Python number becomes a 0-d tensor)."""
        value = values[arg] if isinstance(arg, fx.Node) else arg
        return value if isinstance(value, Tensor) else torch.tensor(float(value))

    def as_function_of_first_input(self, values: dict[fx.Node, Any]) -> Callable[[Tensor], Tensor]:
        """The node as a function of its first tensor argument, everything else fixed."""
        node = self.node
        args, kwargs = self.arguments(values)
        if node.op == "call_module":
            return self.module
        if node.op == "call_method":
            return lambda t: getattr(t, node.target)(*args[1:], **kwargs)
        return lambda t: node.target(t, *args[1:], **kwargs)


def load(arg: Any, values: dict[fx.Node, Any]) -> Any:
    return fx.node.map_arg(arg, lambda n: values[n])


class Plan:
    """The steps with their lookups: by node, and who reads each input-dependent value."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        self.step_of = {step.node: step for step in steps}
        self.consumers: dict[fx.Node, list[fx.Node]] = {}
        for step in steps:
            for parent in step.inputs:
                self.consumers.setdefault(parent, []).append(step.node)
        self._order = {step.node: index for index, step in enumerate(steps)}
        # the engine's release schedules by `keep` (interpreter.py): they go with the plan
        self.release_schedules: dict[str, dict[int, list[fx.Node]]] = {}
        self._held_constant: list[Step] | None = None  # computed once (verify and every schedule read it)

    def held_constant(self) -> list[Step]:
        """The steps whose values the walk holds fixed as independent of the input: every node the
        input does not reach through the steps' inputs (constants, parameters, shape arithmetic,
        modules applied to constant tables) and the shape reads where relevance stops. A wrong
        one (an op taken for a shape) would cut its branch while the totals still conserve:
        `RelevanceEngine.verify` checks that none changes when the input does."""
        if self._held_constant is None:
            self._held_constant = self._find_held_constant()
        return self._held_constant

    def _find_held_constant(self) -> list[Step]:
        reached, todo = set(), [step.node for step in self.steps if step.is_input]
        while todo:
            for child in self.consumers.get(todo.pop(), []):
                if child not in reached:
                    reached.add(child)
                    todo.append(child)
        return [step for step in self.steps if not step.is_input and step.node.op != "output"
                and (step.node not in reached or isinstance(step.op, Meta))]

    def refuse(self, step: Step, error: UnsupportedLayerError) -> None:
        """Turn a claimed step into a refusal (raised if relevance reaches it)."""
        step.op, step.info = UNSUPPORTED, error
        self._held_constant = None  # a refused step may have been a shape read

    def computed_from_the_other(self, step: Step) -> int | None:
        """For a binary op on two input-dependent nodes: the index of the operand the other
        one is computed from (an identity skip in `f(x) + x`, the gated value in `x * g(x)`)."""
        if len(step.inputs) != 2:
            return None
        first, second = step.node.args[0], step.node.args[1]
        if not (isinstance(first, fx.Node) and isinstance(second, fx.Node)):
            return None
        if self._is_ancestor(first, second):
            return 0
        return 1 if self._is_ancestor(second, first) else None

    def _is_ancestor(self, candidate: fx.Node, node: fx.Node) -> bool:
        floor = self._order[candidate]
        seen, todo = set(), [node]
        while todo:
            current = todo.pop()
            for parent in current.all_input_nodes:
                if parent is candidate:
                    return True
                if parent not in seen and self._order[parent] > floor:
                    seen.add(parent)
                    todo.append(parent)
        return False


def build_plan(model: nn.Module, graph: fx.Graph, rules: RuleSet, policy: LeafPolicy,
               canonizers: Iterable[Canonizer] = ()) -> Plan:
    """Claim every node, let the ops annotate, raise UnsupportedLayerError for the first node
    without a rule on a path that relevance takes, then run the canonizers."""
    plan = Plan(_claim_all(model, graph, rules, policy))
    _raise_for_name_rules_that_never_apply(model, plan, rules)
    for step in plan.steps:
        with failing_as_refusal(step, "annotate"):
            step.op.annotate(step, plan)
    _raise_for_unsupported_on_relevance_paths(plan)
    _keep_cut_groups(plan)
    for step in plan.steps:
        with failing_as_refusal(step, "plan"):
            step.nonnegative = step.op.output_nonnegative(step, [plan.step_of[p].nonnegative for p in step.inputs])
    for canonizer in canonizers:
        try:
            canonizer.apply(plan)
        except RelpropError:
            raise
        except Exception as error:  # any failure becomes one line naming the pass
            raise OpFailure(f"relprop's canonizer {type(canonizer).__name__} failed on this model: "
                            f"{first_line(error)}; use bn='pass' and report this") from error
    return plan


def _raise_for_name_rules_that_never_apply(model: nn.Module, plan: Plan, rules: RuleSet) -> None:
    """A rule by name reaches a module relprop keeps whole, or a conv/linear call inside it. A
    subclass of a layer relprop runs itself (timm's BatchNormAct2d, LayerNorm2d: their own
    forward) is traced into, and its inner calls take their ops' defaults: the user's rule would
    be ignored while the map looked fine, so refuse."""
    applied = {step.node.target for step in plan.steps if step.node.op == "call_module"}
    applied |= {module_path(step.node) for step in plan.steps if isinstance(step.op, Linear)}
    traced_into = {module_path(step.node) for step in plan.steps}
    for name in rules.names:
        if name not in applied and name in traced_into:
            raise ConfigError(
                f"the rule for module '{name}' ({type(model.get_submodule(name)).__name__}) would never "
                "apply: relprop traces into that layer (a subclass with its own forward) and its inner "
                "calls take their defaults; key the rule by the function it calls inside (e.g. "
                "rules={torch.nn.functional.batch_norm: rule}) or drop it")


@contextmanager
def failing_as_refusal(step: Step, action: str) -> Iterator[None]:
    """Any unexpected exception of an op on a step becomes one line naming the node and the op
    (the original kept as the cause): a model gets an explanation or a refusal, no traceback."""
    try:
        yield
    except RelpropError:
        raise
    except Exception as error:  # every op's failure, whatever its type
        raise op_failure(step.node, step.module, step.op.name, action, error) from error


def _claim_all(model: nn.Module, graph: fx.Graph, rules: RuleSet, policy: LeafPolicy) -> list[Step]:
    groups = report_groups(model)
    dependent: set[fx.Node] = set()
    shapes: set[fx.Node] = set()  # shapes and sizes computed from the input: no relevance
    steps = []
    for node in graph.nodes:
        module = model.get_submodule(node.target) if node.op == "call_module" else None
        inputs = [arg for arg in node.all_input_nodes if arg in dependent and arg not in shapes]
        if node.op == "placeholder" and node.args:  # an optional argument: its default, a constant
            steps.append(Step(node, CONSTANT))
            continue
        if node.op == "placeholder":
            dependent.add(node)
            steps.append(Step(node, INPUT))
            continue
        if node.op == "output":
            steps.append(Step(node, OUTPUT, inputs))
            continue
        if node.all_input_nodes and all(arg in shapes for arg in node.all_input_nodes) and module is None:
            dependent.add(node)  # arithmetic on shapes (n_h = h // p): a shape too
            shapes.add(node)
            steps.append(Step(node, META_OP))
            continue
        if not inputs:
            steps.append(Step(node, CONSTANT, module=module))
            continue
        dependent.add(node)
        try:
            op = _claim(node, module, rules, policy, len(inputs))
            step = Step(node, op, inputs, op.make_info(), module)
        except UnsupportedLayerError as error:
            step = Step(node, UNSUPPORTED, inputs, error, module)
        except RelpropError:
            raise
        except Exception as error:  # an op's claim failing: refused if relevance comes
            failure = op_failure(node, module, "planner", "claim", error)
            failure.__cause__ = error
            step = Step(node, UNSUPPORTED, inputs, failure, module)
        step.group = _group_of(node, groups)
        if isinstance(step.op, Meta):
            shapes.add(node)
        steps.append(step)
    _name_calls(steps)
    return steps


META_OP = next(op for op in OPS if isinstance(op, Meta))


def _claim(node: fx.Node, module: nn.Module | None, rules: RuleSet, policy: LeafPolicy, inputs: int = 1) -> Op:
    """User rules first, then the op that reproduces a module, then the first op that claims
    the node; else the refusal that names the key a rule would need (`inputs`: how many of its
    arguments depend on the input; a rule sends relevance to the first only)."""
    if node.op == "call_module":
        op = builtin_op(module)
        if op is not None:
            op.check_module(node, module)
            return op
    if node.op == "get_attr":
        return CONSTANT
    if node.op not in ("call_module", "call_function", "call_method"):
        raise UnsupportedLayerError(f"graph node '{node.name}' ({node.op}) is not supported")
    if CUSTOM.covers(node, module, rules, policy):
        return CUSTOM
    for op in OPS:
        if op.claim_module(node, module) if module is not None else op.claim(node):
            return op
    raise unsupported(describe(node, module) + _subclass_hint(module), rule_key(node, module), inputs)


def _subclass_hint(module: nn.Module | None) -> str:
    if module is None:
        return ""
    base = next((t for t in type(module).__mro__ if t in builtin_types()), None)
    return f" (a {base.__name__} subclass that computes its own forward)" if base else ""


def _raise_for_unsupported_on_relevance_paths(plan: Plan) -> None:
    """Layers without a rule matter only where relevance flows (not inside a gate branch)."""
    todo, seen = [plan.steps[-1].node], set()
    while todo:
        step = plan.step_of[todo.pop()]
        if step.op is UNSUPPORTED:
            raise step.info
        with failing_as_refusal(step, "plan"):
            parents = step.op.relevance_parents(step)
        for parent in parents:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)


def report_groups(model: nn.Module) -> set[str]:
    """Candidate entries of the layer-sum report: top-level layers, with containers (layer1,
    features...) opened one level, so residual blocks are listed. Only those that turn out
    to be cuts of the graph are kept (see `_keep_cut_groups`)."""
    groups: set[str] = set()
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            for sub_name, _ in child.named_children():
                groups.add(f"{name}.{sub_name}")
        else:
            groups.add(name)
    return groups


def _group_of(node: fx.Node, groups: set[str]) -> str | None:
    """The report group of a node, per call of its module: `name@k` for the k-th call (fx keys
    a module's later calls `name@1`, `name@2`...); `_name_calls` turns these into report names."""
    for key, (qualified_name, _) in node.meta.get("nn_module_stack", {}).items():
        if qualified_name in groups:
            _, _, call = key.rpartition("@")
            return f"{qualified_name}@{call if call.isdigit() else 0}"
    if node.op == "call_module" and node.target in groups:
        return f"{node.target}@0"
    return None


def _name_calls(steps: list[Step]) -> None:
    """Report names: a module's name, or `name#1`, `name#2`... for a module applied several times.
    Each call is its own entry, kept only if it is a cut: summing the calls would count the same
    relevance once per call (timm's visformer applies `pos_drop` three times in sequence)."""
    calls: dict[str, set[str]] = {}
    for step in steps:
        if step.group is not None:
            name, _, call = step.group.rpartition("@")
            calls.setdefault(name, set()).add(call)
    for step in steps:
        if step.group is not None:
            name, _, call = step.group.rpartition("@")
            step.group = name if len(calls[name]) == 1 else f"{name}#{int(call) + 1}"


def _keep_cut_groups(plan: Plan) -> None:
    """Report only groups that all relevance must cross (a parallel branch is not a cut)."""
    steps = plan.steps
    group_of = {step.node: step.group for step in steps}
    start, end = steps[0].node, steps[-1].node
    for group in {step.group for step in steps if step.group is not None}:
        if _reachable_avoiding(start, end, group, group_of, plan.consumers):
            for step in steps:
                if step.group == group:
                    step.group = None


def _reachable_avoiding(start: fx.Node, end: fx.Node, group: str, group_of: dict, consumers: dict) -> bool:
    seen, todo = {start}, [start]
    while todo:
        for child in consumers.get(todo.pop(), []):
            if child is end:
                return True
            if child not in seen and group_of.get(child) != group:
                seen.add(child)
                todo.append(child)
    return False


def layer_output(plan: Plan, name: str) -> fx.Node:
    """The node whose value a module (leaf or container) returns: the one node of its scope
    that is read outside it."""
    def inside(node: fx.Node) -> bool:
        path = node.target if node.op == "call_module" else module_path(node)
        return isinstance(path, str) and (path == name or path.startswith(name + "."))

    base, _, call = name.partition("#")
    calls = [step.node for step in plan.steps if step.node.op == "call_module" and step.node.target == base]
    if len(calls) == 1 and not call:
        return calls[0]
    if calls:  # a module applied several times: its calls are named as in the layer sums
        if call.isdigit() and 1 <= int(call) <= len(calls):
            return calls[int(call) - 1]
        raise ConfigError(f"layers: module '{base}' is applied {len(calls)} times; name one call, "
                          f"'{base}#1' to '{base}#{len(calls)}'")
    scope = [step for step in plan.steps if step.op not in (INPUT, OUTPUT) and inside(step.node)]
    read_outside = {parent for step in plan.steps if not inside(step.node) for parent in step.inputs
                    if inside(parent)}
    if len(read_outside) != 1 or not scope:
        found = "no operation" if not scope else f"{len(read_outside)} outputs"
        raise ConfigError(f"layers: '{name}' is not a module with one output in the traced graph ({found})")
    return read_outside.pop()
