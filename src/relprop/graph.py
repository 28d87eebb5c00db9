"""Tracing a model into a `torch.fx` graph and classifying every node by how relevance
crosses it. Classification happens once, when an explainer is built, so an unsupported
layer is reported before any image is processed."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from relprop.errors import TraceError, UnsupportedLayerError

# How relevance crosses a node.
LINEAR = "linear"  # Conv2d / Linear: an LRP rule
PASS = "pass"  # unchanged: ReLU, BatchNorm, Dropout, Identity, x * constant
POOL = "pool"  # positive linear maps: avg / adaptive-avg / sum / mean pooling
MAXPOOL = "maxpool"
ROUTE = "route"  # reshapes, permutes, slicing: relevance follows the elements
ADD = "add"  # residual add: Relevance Splitting
CAT = "cat"
SCALE = "scale"  # x * c, x / c: relevance passes to the input-dependent operand
CUSTOM = "custom"  # a module type the user gave a rule for
META = "meta"  # x.size(), shapes: no relevance
INPUT = "input"
OUTPUT = "output"
CONSTANT = "constant"  # does not depend on the input
UNSUPPORTED = "unsupported"  # no rule: an error if relevance ever reaches it

PASS_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Identity,
)
POOL_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
ROUTE_MODULES = (nn.Flatten, nn.Unflatten)
KNOWN_MODULES = (nn.Conv2d, nn.Linear, nn.MaxPool2d, *PASS_MODULES, *POOL_MODULES, *ROUTE_MODULES)

PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.dropout, F.dropout1d, F.dropout2d, torch.dropout}
POOL_FUNCTIONS = {F.avg_pool2d, F.adaptive_avg_pool2d, torch.mean, torch.sum}
ROUTE_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
    operator.getitem,
}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
CAT_FUNCTIONS = {torch.cat, torch.concat}
SCALE_FUNCTIONS = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul}
META_FUNCTIONS = {getattr, operator.floordiv, operator.sub, len}

PASS_METHODS = {"relu", "relu_", "contiguous", "clone", "detach", "float", "to", "type"}
POOL_METHODS = {"mean", "sum"}
ROUTE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "t"}
ADD_METHODS = {"add", "add_"}
SCALE_METHODS = {"mul", "mul_", "div", "div_"}
META_METHODS = {"size", "dim", "numel"}

# In-place variants would overwrite activations that relevance rules still need.
OUT_OF_PLACE = {operator.iadd: operator.add, operator.imul: operator.mul,
                operator.itruediv: operator.truediv}
OUT_OF_PLACE_METHODS = {"relu_": "relu", "add_": "add", "mul_": "mul", "div_": "div"}


@dataclass
class Step:
    """One graph node with what the interpreter needs to run it forwards and backwards."""

    node: fx.Node
    kind: str
    module: nn.Module | None = None
    group: str | None = None  # the report entry (top-level layer or residual block) it belongs to
    skip: int | None = None  # ADD: index of the operand that is an identity skip
    is_input_layer: bool = False  # LINEAR: consumes the image
    gate: int | None = None  # SCALE of two tensors: index of the gate operand (gets no relevance)
    error: UnsupportedLayerError | None = None  # UNSUPPORTED: raised if relevance reaches it
    inputs: list[fx.Node] = field(default_factory=list)  # input-dependent node arguments
    nonnegative: bool = False  # the output is >= 0 by construction (after a ReLU, pooled...)


class _Tracer(fx.Tracer):
    """fx tracer that keeps known and user-ruled modules as leaves and remembers where it is,
    so a failure can name the module it happened in."""

    def __init__(self, leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.relprop_path: list[tuple[str, nn.Module]] = []
        self.failed_in: tuple[str, nn.Module] | None = None  # innermost module of a failure

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self.relprop_path.append((self.path_of_module(m), m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.relprop_path[-1]
            raise
        finally:
            self.relprop_path.pop()


def trace(model: nn.Module, leaf_types: Iterable[type] = ()) -> fx.Graph:
    """The model's graph with in-place ops replaced by their out-of-place twins."""
    tracer = _Tracer((*KNOWN_MODULES, *leaf_types))
    try:
        graph = tracer.trace(model)
    except Exception as error:  # fx raises many types; all mean "not traceable as written"
        where = _describe_module(tracer.failed_in)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TraceError(
            f"cannot trace {type(model).__name__}{where} with torch.fx: {first_line}. "
            "Make that module a leaf with a rule (rules={ThatModuleType: rule}) or explain a "
            "traceable sub-module."
        ) from error
    for node in graph.nodes:
        if node.op == "call_function" and node.target in OUT_OF_PLACE:
            node.target = OUT_OF_PLACE[node.target]
        elif node.op == "call_method" and node.target in OUT_OF_PLACE_METHODS:
            node.target = OUT_OF_PLACE_METHODS[node.target]
        if node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
    return graph


def _describe_module(failed_in: tuple[str, nn.Module] | None) -> str:
    if failed_in is None:
        return ""
    name, module = failed_in
    return f" in module '{name}' ({type(module).__name__})"


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
    for _, (qualified_name, _) in node.meta.get("nn_module_stack", {}).items():
        if qualified_name in groups:
            return qualified_name
    if node.op == "call_module" and node.target in groups:
        return node.target
    return None


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack", {})
    return next(reversed(stack.values()))[0] if stack else ""


def build_steps(model: nn.Module, graph: fx.Graph, ruled_types: tuple[type, ...]) -> list[Step]:
    """Classify every node; raise UnsupportedLayerError for the first one without a rule."""
    groups = report_groups(model)
    dependent: set[fx.Node] = set()
    steps = []
    for node in graph.nodes:
        inputs = [arg for arg in node.all_input_nodes if arg in dependent]
        if node.op == "placeholder":
            dependent.add(node)
            steps.append(Step(node, INPUT))
            continue
        if node.op == "output":
            steps.append(Step(node, OUTPUT, inputs=inputs))
            continue
        if not inputs:
            steps.append(Step(node, CONSTANT))
            continue
        dependent.add(node)
        try:
            step = _classify(model, node, ruled_types)
        except UnsupportedLayerError as error:
            module = model.get_submodule(node.target) if node.op == "call_module" else None
            step = Step(node, UNSUPPORTED, module, error=error)
        step.inputs = inputs
        step.group = _group_of(node, groups)
        steps.append(step)
    _mark_operand_roles(steps)
    _raise_for_unsupported_on_relevance_paths(steps)
    _mark_input_layers(steps)
    _keep_cut_groups(steps)
    _mark_nonnegative(steps)
    return steps


def relevance_parents(step: Step) -> list[fx.Node]:
    if step.kind == SCALE and step.gate is not None:
        return [step.node.args[1 - step.gate]]
    return step.inputs


def _raise_for_unsupported_on_relevance_paths(steps: list[Step]) -> None:
    """Layers without a rule matter only where relevance flows (not inside a gate branch)."""
    by_node = {step.node: step for step in steps}
    todo, seen = [steps[-1].node], set()
    while todo:
        step = by_node[todo.pop()]
        if step.kind == UNSUPPORTED:
            raise step.error
        for parent in relevance_parents(step):
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)


RELU_FUNCTIONS = {F.relu, torch.relu, F.relu6}


def _mark_nonnegative(steps: list[Step]) -> None:
    """Which outputs cannot be negative: rules can then skip checking their inputs."""
    by_node = {step.node: step for step in steps}
    for step in steps:
        node = step.node
        if isinstance(step.module, (nn.ReLU, nn.ReLU6)) or (node.op == "call_function" and node.target in RELU_FUNCTIONS) \
                or (node.op == "call_method" and node.target == "relu"):
            step.nonnegative = True
        elif step.kind in (MAXPOOL, POOL, ROUTE, CAT, ADD) or (
                step.kind == PASS and not isinstance(step.module, (nn.BatchNorm1d, nn.BatchNorm2d))):
            parents = [by_node[parent] for parent in step.inputs]
            step.nonnegative = bool(parents) and all(parent.nonnegative for parent in parents) and \
                (step.kind != ADD or len(step.inputs) == 2)


def _keep_cut_groups(steps: list[Step]) -> None:
    """Report only groups that all relevance must cross (a parallel branch is not a cut)."""
    consumers: dict[fx.Node, list[fx.Node]] = {}
    for step in steps:
        for parent in step.inputs:
            consumers.setdefault(parent, []).append(step.node)
    group_of = {step.node: step.group for step in steps}
    start, end = steps[0].node, steps[-1].node
    for group in {step.group for step in steps if step.group is not None}:
        if _reachable_avoiding(start, end, group, group_of, consumers):
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


def _classify(model: nn.Module, node: fx.Node, ruled_types: tuple[type, ...]) -> Step:
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        if ruled_types and isinstance(module, ruled_types):
            return Step(node, CUSTOM, module)
        for kind, types in ((LINEAR, (nn.Conv2d, nn.Linear)), (MAXPOOL, (nn.MaxPool2d,)),
                            (PASS, PASS_MODULES), (POOL, POOL_MODULES), (ROUTE, ROUTE_MODULES)):
            if isinstance(module, types):
                return Step(node, kind, module)
        raise _unsupported(f"module '{node.target}' ({type(module).__name__})", type(module).__name__)
    if node.op == "call_function":
        target = node.target
        for kind, functions in ((PASS, PASS_FUNCTIONS), (POOL, POOL_FUNCTIONS), (ROUTE, ROUTE_FUNCTIONS),
                                (ADD, ADD_FUNCTIONS), (CAT, CAT_FUNCTIONS), (SCALE, SCALE_FUNCTIONS),
                                (META, META_FUNCTIONS)):
            if target in functions:
                return Step(node, kind)
        if target is F.max_pool2d or getattr(target, "__name__", "") == "_max_pool2d":
            return Step(node, MAXPOOL)
        name = getattr(target, "__name__", repr(target))
        raise _unsupported(f"function '{name}' (node '{node.name}'{in_module(node)})", name)
    if node.op == "call_method":
        for kind, methods in ((PASS, PASS_METHODS), (POOL, POOL_METHODS), (ROUTE, ROUTE_METHODS),
                              (ADD, ADD_METHODS), (SCALE, SCALE_METHODS), (META, META_METHODS)):
            if node.target in methods:
                return Step(node, kind)
        raise _unsupported(f"tensor method '.{node.target}()' (node '{node.name}'{in_module(node)})",
                           node.target)
    if node.op == "get_attr":
        return Step(node, CONSTANT)
    raise UnsupportedLayerError(f"graph node '{node.name}' ({node.op}) is not supported")


def in_module(node: fx.Node) -> str:
    path = _module_path(node)
    return f" in module '{path}'" if path else ""


def _unsupported(what: str, type_name: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"relprop has no relevance rule for {what}; pass rules={{{type_name}: rule}} "
        "(a module type with a rule name such as 'pass' or 'zplus', or a relprop.rules.Rule) "
        "to LRP(...) or RelevanceEngine(...)"
    )


def _mark_operand_roles(steps: list[Step]) -> None:
    """Where one operand of a binary op is computed from the other: in an add it is an
    identity skip (`f(x) + x`); in a product the other one is a gate (`x * g(x)`)."""
    order = {step.node: index for index, step in enumerate(steps)}
    for step in steps:
        if step.kind not in (ADD, SCALE) or len(step.inputs) != 2:
            continue
        first, second = step.node.args[0], step.node.args[1]
        if not (isinstance(first, fx.Node) and isinstance(second, fx.Node)):
            continue
        source = 0 if _is_ancestor(first, second, order) else 1 if _is_ancestor(second, first, order) else None
        if source is None:
            continue
        if step.kind == ADD:
            step.skip = source
        else:
            step.gate = 1 - source


def _is_ancestor(candidate: fx.Node, node: fx.Node, order: dict[fx.Node, int]) -> bool:
    floor = order[candidate]
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        for parent in current.all_input_nodes:
            if parent is candidate:
                return True
            if parent not in seen and order[parent] > floor:
                seen.add(parent)
                todo.append(parent)
    return False


def _mark_input_layers(steps: list[Step]) -> None:
    """Linear layers that see the image itself (possibly through reshapes or pass-throughs)."""
    by_node = {step.node: step for step in steps}
    for step in steps:
        if step.kind != LINEAR:
            continue
        current = step.inputs[0]
        while by_node[current].kind in (ROUTE, PASS) and by_node[current].inputs:
            current = by_node[current].inputs[0]
        step.is_input_layer = by_node[current].kind == INPUT
