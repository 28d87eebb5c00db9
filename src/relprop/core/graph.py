"""Tracing a model into a `torch.fx` graph and classifying every node by how relevance
crosses it. Classification happens once, when an explainer is built, so an unsupported
layer is reported before any image is processed."""

from __future__ import annotations

import operator
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from relprop.core.rules import LINEAR_TYPES
from relprop.errors import TraceError, UnsupportedLayerError


def _swin_attention_types() -> tuple[type[nn.Module], ...]:
    """torchvision's Swin (v1) window attention: a leaf, its function is reproduced by the engine."""
    try:
        from torchvision.models.swin_transformer import ShiftedWindowAttention
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return ()
    return (ShiftedWindowAttention,)


class Kind(str, Enum):
    """How relevance crosses a node (the engine has one handler per kind)."""

    LINEAR = "linear"  # Linear, ConvNd, ConvTransposeNd (modules or functional calls): an LRP rule
    PASS = "pass"  # unchanged: ReLU, BatchNorm, Dropout, Identity
    POOL = "pool"  # positive linear maps: avg / adaptive-avg / sum / mean pooling, upsampling
    MAXPOOL = "maxpool"
    ROUTE = "route"  # reshapes, permutes, slicing, zero padding: relevance follows the elements
    ADD = "add"  # residual add: Relevance Splitting
    CAT = "cat"
    SCALE = "scale"  # x * c, x / c, x * gate(x): relevance stays with the input-dependent operand
    MATMUL = "matmul"  # a product of two tensors (attention's QKᵀ and A·V): the bilinear rule
    SOFTMAX = "softmax"  # softmax inside attention (its output feeds A·V): AttnLRP's rule
    ATTENTION = "attention"  # scaled_dot_product_attention, nn.MultiheadAttention, Swin's window attention
    CUSTOM = "custom"  # a module, function or method the user gave a rule for
    META = "meta"  # x.size(), shapes: no relevance
    INPUT = "input"
    OUTPUT = "output"
    CONSTANT = "constant"  # does not depend on the input
    UNSUPPORTED = "unsupported"  # no rule: an error if relevance ever reaches it


(LINEAR, PASS, POOL, MAXPOOL, ROUTE, ADD, CAT, SCALE, MATMUL, SOFTMAX, ATTENTION, CUSTOM, META, INPUT,
 OUTPUT, CONSTANT, UNSUPPORTED) = Kind

BATCHNORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Elementwise nonlinearities and normalizations take the identity rule: relevance passes
# unchanged (AttnLRP, Achtibat et al. 2024, and its LXT code: elementwise activations; LayerNorm,
# GroupNorm with the divisor treated as constant, as "identity on the normalization").
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
                      nn.ELU, nn.Mish)
NORM_MODULES = (nn.LayerNorm, nn.GroupNorm)
PASS_MODULES = (
    *BATCHNORM_MODULES, *ACTIVATION_MODULES, *NORM_MODULES, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.Identity,
)
POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
ROUTE_MODULES = (nn.Flatten, nn.Unflatten)
ATTENTION_MODULES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention, *_swin_attention_types())
# Module types whose computation the engine reproduces itself, by kind. A module gets this
# built-in handling only if it computes exactly what its torch class computes (see `builtin_kind`).
BUILTIN_MODULES: tuple[tuple[Kind, tuple[type[nn.Module], ...]], ...] = (
    (LINEAR, LINEAR_TYPES), (MAXPOOL, MAXPOOL_MODULES), (PASS, PASS_MODULES), (POOL, POOL_MODULES),
    (ROUTE, ROUTE_MODULES), (POOL, (nn.Upsample,)), (ATTENTION, ATTENTION_MODULES),
)
_BUILTIN_TYPES = tuple(t for _, types in BUILTIN_MODULES for t in types)
# Upsampling modes whose interpolation weights are non-negative: relevance goes in proportion.
POSITIVE_INTERPOLATION = {"nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area"}
SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmax2d)

NORM_FUNCTIONS = {F.batch_norm, F.layer_norm, F.group_norm}
LINEAR_FUNCTIONS = {F.linear: nn.Linear, F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.leaky_relu,
                  F.elu, F.mish, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout,
                  F.batch_norm, F.layer_norm, F.group_norm}
POOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                  F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.mean, torch.sum}
MAXPOOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d}
ROUTE_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
    operator.getitem, torch.roll,
}
# torchvision's Swin patch merging (pad, four strided slices, cat): relevance follows the elements
ROUTE_FUNCTION_KEYS = {"torchvision.models.swin_transformer._patch_merging_pad"}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm}
MATMUL_METHODS = {"matmul", "bmm"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
CAT_FUNCTIONS = {torch.cat, torch.concat}
SCALE_FUNCTIONS = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul}
META_FUNCTIONS = {getattr, operator.floordiv, operator.sub, len}
SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax}
DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout}

PASS_METHODS = {"relu", "relu_", "contiguous", "clone", "detach", "float", "to", "type"}
# Methods that return several tensors: relevance arrives per element (through getitem).
SPLIT_METHODS = {"chunk", "split", "unbind", "tensor_split"}
SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.unbind, torch.tensor_split}
POOL_METHODS = {"mean", "sum"}
ROUTE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "t", "roll",
                 "expand"}
ADD_METHODS = {"add", "add_"}
SCALE_METHODS = {"mul", "mul_", "div", "div_"}
META_METHODS = {"size", "dim", "numel"}
SOFTMAX_METHODS = {"softmax", "log_softmax"}
ATTENTION_SOFTMAX = {F.softmax, torch.softmax, "softmax"}  # log_softmax is never attention

# In-place variants would overwrite activations that relevance rules still need.
OUT_OF_PLACE = {operator.iadd: operator.add, operator.imul: operator.mul,
                operator.itruediv: operator.truediv}
OUT_OF_PLACE_METHODS = {"relu_": "relu", "add_": "add", "mul_": "mul", "div_": "div"}


def builtin_kind(module: nn.Module) -> Kind | None:
    """The kind of a module whose computation is exactly its torch class's: the class itself,
    or a subclass that overrides neither `forward` nor `_conv_forward`. A subclass with its own
    `forward` (timm's StdConv2d, BatchNormAct2d, a home-made conv) computes something else, so
    it is traced into instead: its real operations are what gets interpreted."""
    if "forward" in vars(module):  # a forward replaced on the instance
        return None
    for kind, types in BUILTIN_MODULES:
        base = next((t for t in type(module).__mro__ if t in types), None)
        if base is None:
            continue
        if all(getattr(type(module), attr, None) is getattr(base, attr, None)
               for attr in ("forward", "_conv_forward")):
            return kind
        return None
    return None


@dataclass(frozen=True)
class UserRules:
    """Where the user's rules apply: module types and qualified module names, functions
    (`F.interpolate`) and tensor-method names (`"softmax"`)."""

    types: tuple[type, ...] = ()
    names: frozenset[str] = frozenset()
    functions: frozenset[Any] = frozenset()
    methods: frozenset[str] = frozenset()

    def leaf_types(self) -> tuple[type, ...]:
        """Ruled types become graph leaves, except the layer classes the engine runs itself and
        their subclasses (traced into, so the rule applies to the operations inside)."""
        return tuple(t for t in self.types if not issubclass(t, _BUILTIN_TYPES))

    def covers(self, node: fx.Node, module: nn.Module | None) -> bool:
        if node.op == "call_module":
            return (node.target in self.names and not isinstance(module, _BUILTIN_TYPES)) \
                or isinstance(module, self.leaf_types())
        if node.op == "call_function":
            return node.target in self.functions
        return node.op == "call_method" and node.target in self.methods


@dataclass
class Step:
    """One graph node with what the interpreter needs to run it forwards and backwards."""

    node: fx.Node
    kind: Kind
    module: nn.Module | None = None
    group: str | None = None  # the report entry (top-level layer or residual block) it belongs to
    skip: int | None = None  # ADD: index of the operand that is an identity skip
    is_input_layer: bool = False  # LINEAR: consumes the image
    gate: int | None = None  # SCALE of two tensors: index of the gate operand (gets no relevance)
    error: UnsupportedLayerError | None = None  # UNSUPPORTED: raised if relevance reaches it
    inputs: list[fx.Node] = field(default_factory=list)  # input-dependent node arguments
    nonnegative: bool = False  # the output is >= 0 by construction (after a ReLU, pooled...)
    fold_after: fx.Node | None = None  # LINEAR: the BatchNorm right after it, folded into its rule
    fold_before: fx.Node | None = None  # LINEAR: the BatchNorm right before it, folded likewise
    folded_into: fx.Node | None = None  # a folded BatchNorm: the layer that now accounts for it


class _Tracer(fx.Tracer):
    """fx tracer that keeps known and user-ruled modules as leaves and remembers where it is,
    so a failure can name the module it happened in."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str]) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.relprop_path: list[tuple[str, nn.Module]] = []
        self.failed_in: tuple[str, nn.Module] | None = None  # innermost module of a failure

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if builtin_kind(m) is not None or isinstance(m, self.leaf_types):
            return True
        if module_qualified_name in self.leaf_names and not isinstance(m, _BUILTIN_TYPES):
            return True
        return super().is_leaf_module(m, module_qualified_name)

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


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval semantics for the duration, every submodule's own mode restored afterwards (the
    user's model is never modified; traced code may branch on `self.training`)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def trace(model: nn.Module, rules: UserRules | None = None) -> fx.Graph:
    """The model's graph, traced in eval mode, with in-place ops replaced by their out-of-place
    twins. Modules the user gave a rule (by type or name) stay leaves."""
    rules = rules or UserRules()
    tracer = _Tracer(rules.leaf_types(), rules.names)
    try:
        with eval_mode(model):
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


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack", {})
    return next(reversed(stack.values()))[0] if stack else ""


def build_steps(model: nn.Module, graph: fx.Graph, rules: UserRules | None = None,
                fold_batchnorm: bool = False) -> list[Step]:
    """Classify every node; raise UnsupportedLayerError for the first one without a rule on a
    path that relevance takes. With `fold_batchnorm`, pair BatchNorms with adjacent layers."""
    rules = rules or UserRules()
    groups = report_groups(model)
    dependent: set[fx.Node] = set()
    steps = []
    shapes: set[fx.Node] = set()  # shapes and sizes computed from the input: no relevance
    for node in graph.nodes:
        inputs = [arg for arg in node.all_input_nodes if arg in dependent and arg not in shapes]
        if node.op == "placeholder":
            if node.args:  # an optional argument (timm's attn_mask=None): its default, a constant
                steps.append(Step(node, CONSTANT))
                continue
            dependent.add(node)
            steps.append(Step(node, INPUT))
            continue
        if node.op == "output":
            steps.append(Step(node, OUTPUT, inputs=inputs))
            continue
        if node.all_input_nodes and all(arg in shapes for arg in node.all_input_nodes) \
                and node.op != "call_module":
            dependent.add(node)  # arithmetic on shapes (n_h = h // p): a shape too
            shapes.add(node)
            steps.append(Step(node, META))
            continue
        if not inputs:
            steps.append(Step(node, CONSTANT))
            continue
        dependent.add(node)
        try:
            step = _classify(model, node, rules)
        except UnsupportedLayerError as error:
            module = model.get_submodule(node.target) if node.op == "call_module" else None
            step = Step(node, UNSUPPORTED, module, error=error)
        step.inputs = inputs
        step.group = _group_of(node, groups)
        if step.kind == META:
            shapes.add(node)
        steps.append(step)
    _mark_operand_roles(steps)
    _mark_attention_weights(steps)
    _raise_for_unsupported_on_relevance_paths(steps)
    _mark_input_layers(steps)
    _keep_cut_groups(steps)
    _mark_nonnegative(steps)
    if fold_batchnorm:
        _plan_batchnorm_folds(steps)
    return steps


def layer_output(steps: list[Step], name: str) -> fx.Node:
    """The node whose value a module (leaf or container) returns: the one node of its scope
    that is read outside it."""
    def inside(node: fx.Node) -> bool:
        path = node.target if node.op == "call_module" else module_path(node)
        return isinstance(path, str) and (path == name or path.startswith(name + "."))

    for step in steps:
        if step.node.op == "call_module" and step.node.target == name:
            return step.node
    scope = [step for step in steps if step.kind not in (INPUT, OUTPUT) and inside(step.node)]
    read_outside = {parent for step in steps if not inside(step.node) for parent in step.inputs
                    if inside(parent)}
    if len(read_outside) != 1 or not scope:
        found = "no operation" if not scope else f"{len(read_outside)} outputs"
        raise ValueError(f"layers: '{name}' is not a module with one output in the traced graph ({found})")
    return read_outside.pop()


BATCH_NORM_PARAMETERS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def batch_norm_arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    """`F.batch_norm`'s arguments by name, however the call spelled them."""
    return dict(zip(BATCH_NORM_PARAMETERS, args, strict=False)) | dict(kwargs)


def is_batchnorm(step: Step) -> bool:
    """A BatchNorm in eval mode with running statistics (the kind that can be folded)."""
    node = step.node
    if step.kind != PASS:
        return False
    if isinstance(step.module, BATCHNORM_MODULES):
        return step.module.running_mean is not None and step.module.running_var is not None
    if node.op == "call_function" and node.target is F.batch_norm:
        bound = batch_norm_arguments(node.args, node.kwargs)
        return bound.get("training", False) is False and bound.get("running_mean") is not None \
            and bound.get("running_var") is not None
    return False


def _plan_batchnorm_folds(steps: list[Step]) -> None:
    """conv→BN and BN→conv pairs with nothing else reading the value between them: the rule of
    the layer then sees the effective (folded) layer, as the LRP literature canonizes."""
    by_node = {step.node: step for step in steps}
    consumers = _consumers(steps)
    for step in steps:
        if step.kind != LINEAR or len(step.inputs) != 1:
            continue
        after = consumers.get(step.node, [])
        if len(after) == 1 and is_batchnorm(by_node[after[0]]) and by_node[after[0]].inputs == [step.node]:
            step.fold_after = after[0]
            by_node[after[0]].folded_into = step.node
        before = by_node[step.inputs[0]]
        if is_batchnorm(before) and consumers.get(before.node) == [step.node] and before.folded_into is None \
                and len(before.inputs) == 1:
            step.fold_before = before.node
            before.folded_into = step.node


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
        elif step.kind in (MAXPOOL, POOL, ROUTE, CAT, ADD) or (step.kind == PASS and not _normalizes(step)):
            parents = [by_node[parent] for parent in step.inputs]
            step.nonnegative = bool(parents) and all(parent.nonnegative for parent in parents) and \
                (step.kind != ADD or len(step.inputs) == 2)


def _normalizes(step: Step) -> bool:
    """BatchNorm, LayerNorm, GroupNorm (modules or functional) shift and rescale: a non-negative
    input can come out negative, unlike the other identity-rule nodes (activations, dropout)."""
    node = step.node
    return isinstance(step.module, (*BATCHNORM_MODULES, *NORM_MODULES)) or (
        node.op == "call_function" and node.target in NORM_FUNCTIONS)


def _keep_cut_groups(steps: list[Step]) -> None:
    """Report only groups that all relevance must cross (a parallel branch is not a cut)."""
    consumers = _consumers(steps)
    group_of = {step.node: step.group for step in steps}
    start, end = steps[0].node, steps[-1].node
    for group in {step.group for step in steps if step.group is not None}:
        if _reachable_avoiding(start, end, group, group_of, consumers):
            for step in steps:
                if step.group == group:
                    step.group = None


def _consumers(steps: list[Step]) -> dict[fx.Node, list[fx.Node]]:
    """node -> the nodes that read it (as an input that depends on the model's input)."""
    consumers: dict[fx.Node, list[fx.Node]] = {}
    for step in steps:
        for parent in step.inputs:
            consumers.setdefault(parent, []).append(step.node)
    return consumers


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


def _classify(model: nn.Module, node: fx.Node, rules: UserRules) -> Step:
    if node.op == "call_module":
        return _classify_module(model, node, rules)
    if node.op == "call_function":
        return _classify_function(node, rules)
    if node.op == "call_method":
        if node.target in rules.methods:
            return Step(node, CUSTOM)
        what = f"tensor method '.{node.target}()' (node '{node.name}'{in_module(node)})"
        if node.target in ATTENTION_SOFTMAX:
            return Step(node, SOFTMAX, error=_softmax_error(what))
        if node.target in SOFTMAX_METHODS:
            raise _softmax_error(what)
        if node.target in MATMUL_METHODS:
            return Step(node, MATMUL)
        if node.target == "masked_fill" and _fill_value(node) in (0.0, float("-inf")):
            return Step(node, ROUTE)  # masking scores (−inf) or zeroing: filled elements take nothing
        for kind, methods in ((PASS, PASS_METHODS), (POOL, POOL_METHODS), (ROUTE, ROUTE_METHODS | SPLIT_METHODS),
                              (ADD, ADD_METHODS), (SCALE, SCALE_METHODS), (META, META_METHODS)):
            if node.target in methods:
                return Step(node, kind)
        raise _unsupported(what, repr(node.target))
    if node.op == "get_attr":
        return Step(node, CONSTANT)
    raise UnsupportedLayerError(f"graph node '{node.name}' ({node.op}) is not supported")


def _classify_module(model: nn.Module, node: fx.Node, rules: UserRules) -> Step:
    module = model.get_submodule(node.target)
    what = f"module '{node.target}' ({type(module).__name__})"
    kind = builtin_kind(module)
    if kind == ATTENTION and isinstance(module, nn.MultiheadAttention):
        _check_multihead_attention(module, what)
    if kind is not None and not (isinstance(module, nn.Upsample) and module.mode not in POSITIVE_INTERPOLATION):
        return Step(node, kind, module)
    if rules.covers(node, module):
        return Step(node, CUSTOM, module)
    if type(module) is nn.Softmax:
        return Step(node, SOFTMAX, module, error=_softmax_error(what))
    if isinstance(module, SOFTMAX_MODULES):
        raise _softmax_error(what)
    if isinstance(module, nn.Upsample):
        raise _unsupported(f"{what} in mode {module.mode!r} (its interpolation weights can be negative)",
                           _type_key(type(module)))
    base = next((t for t in type(module).__mro__ if t in _BUILTIN_TYPES), None)
    hint = f" (a {base.__name__} subclass that computes its own forward)" if base and kind is None else ""
    raise _unsupported(what + hint, _type_key(type(module)))


def _classify_function(node: fx.Node, rules: UserRules) -> Step:
    target = node.target
    what = f"function '{_function_key(target)}' (node '{node.name}'{in_module(node)})"
    if target in rules.functions:
        return Step(node, CUSTOM)
    if target in LINEAR_FUNCTIONS:
        return Step(node, LINEAR)
    if target is F.interpolate:
        mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
        if mode in POSITIVE_INTERPOLATION:
            return Step(node, POOL)
        raise _unsupported(f"{what} in mode {mode!r} (its interpolation weights can be negative)",
                           _function_key(target))
    if target is F.pad:
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        if mode == "constant" and not value:
            return Step(node, ROUTE)  # zero padding: relevance follows the elements it keeps
    if target in ATTENTION_SOFTMAX:
        return Step(node, SOFTMAX, error=_softmax_error(what))
    if target in SOFTMAX_FUNCTIONS:
        raise _softmax_error(what)
    if target is F.scaled_dot_product_attention:
        return Step(node, ATTENTION)
    if target in MATMUL_FUNCTIONS:
        return Step(node, MATMUL)
    if _function_key(target) in ROUTE_FUNCTION_KEYS:
        return Step(node, ROUTE)
    if _function_key(target) == "timm.layers.attention.resolve_self_attn_mask":
        return Step(node, META)  # a mask built from the scores' shape and dtype only
    if _function_key(target) == "timm.layers.attention.maybe_add_mask":
        return Step(node, PASS)  # scores + a constant mask (or None): the scores keep it all
    if _function_key(target) == "torchvision.ops.stochastic_depth.stochastic_depth":
        return Step(node, PASS)  # traced in eval mode: identity (training=False in its arguments)
    for kind, functions in ((PASS, PASS_FUNCTIONS), (POOL, POOL_FUNCTIONS), (ROUTE, ROUTE_FUNCTIONS | SPLIT_FUNCTIONS),
                            (ADD, ADD_FUNCTIONS), (CAT, CAT_FUNCTIONS), (SCALE, SCALE_FUNCTIONS),
                            (META, META_FUNCTIONS), (MAXPOOL, MAXPOOL_FUNCTIONS)):
        if target in functions:
            return Step(node, kind)
    if getattr(target, "__name__", "") in ("_max_pool1d", "_max_pool2d", "_max_pool3d"):
        return Step(node, MAXPOOL)
    raise _unsupported(what, _function_key(target))


def in_module(node: fx.Node) -> str:
    path = module_path(node)
    return f" in module '{path}'" if path else ""


def _type_key(layer_type: type) -> str:
    module = layer_type.__module__
    if module.startswith("torch.nn.modules"):
        return f"torch.nn.{layer_type.__name__}"
    return f"{module}.{layer_type.__qualname__}"


def _function_key(function: Any) -> str:
    module = getattr(function, "__module__", None) or "torch"
    name = getattr(function, "__name__", repr(function))
    if module == "_operator":
        module = "operator"
    return f"{module}.{name}"


def _unsupported(what: str, key: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"relprop has no relevance rule for {what}; pass rules={{{key}: rule}} to LRP(...) "
        "with a rule name ('pass' for elementwise maps, 'proportional' for positive linear maps "
        "such as pooling, 'zplus', ...) or a relprop.core.rules.Rule"
    )


def _softmax_error(what: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"the model applies softmax in {what}: LRP explains the scores before the softmax and "
        "starts from the probability itself; remove the softmax from the model (explain the "
        "logits), or give it a rule if it sits inside the network"
    )


def _fill_value(node: fx.Node) -> Any:
    value = node.kwargs.get("value", node.args[2] if len(node.args) > 2 else None)
    return float(value) if isinstance(value, (int, float)) else None


def _check_multihead_attention(module: nn.MultiheadAttention, what: str) -> None:
    """The engine reproduces nn.MultiheadAttention with one packed in-projection and no extra
    key/value biases or zero-attention rows (torchvision's ViT); refuse the other variants."""
    if module.bias_k is not None or module.add_zero_attn or not module._qkv_same_embed_dim:
        raise UnsupportedLayerError(
            f"relprop supports {what} only with kdim = vdim = embed_dim, add_bias_kv=False and "
            "add_zero_attn=False; give it a rule (rules={nn.MultiheadAttention: rule}) or use that form"
        )


def _mark_attention_weights(steps: list[Step]) -> None:
    """A softmax is attention when everything that reads it (through dropout and other
    pass-throughs) is the first factor of a product `A @ V`; that product then knows its
    weights operand (`gate` = 0). Any other softmax (at the output: probabilities) is refused."""
    by_node = {step.node: step for step in steps}
    consumers = _consumers(steps)
    for step in steps:
        if step.kind != SOFTMAX:
            continue
        products = _attention_products(step.node, consumers, by_node)
        if products is None:
            step.kind = UNSUPPORTED
            continue
        for product in products:
            product.gate = 0


def _attention_products(node: fx.Node, consumers: dict[fx.Node, list[fx.Node]],
                        by_node: dict[fx.Node, Step]) -> list[Step] | None:
    found, todo = [], [node]
    while todo:
        current = todo.pop()
        readers = [by_node[reader] for reader in consumers.get(current, [])]
        if not readers:
            return None
        for reader in readers:
            if reader.kind == PASS and not _normalizes(reader):
                todo.append(reader.node)
            elif reader.kind == MATMUL and reader.node.args[0] is current and reader.node.args[1] is not current:
                found.append(reader)
            else:
                return None
    return found


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
