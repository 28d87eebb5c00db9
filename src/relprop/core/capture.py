"""The capture path for models torch.fx cannot trace symbolically: the same fx tracer, run with
the example input's values beside every proxy, so Python that reads a shape (`if H % 2`,
`math.ceil(W / p)`, `len(x)`, `B, N, C = x.shape`) gets the example's numbers and the graph is
specialized to that input shape (the engine re-captures per shape).

Why fx with values and not torch.export or dynamo: they inline every module into aten (or
torch-level) calls, rename parameters (`L__self___conv1_weight`) and carry symbolic sizes, so
each op and each rule keyed by module type or name would need a translation back; a capture
of timm's tf_efficientnetv2_b0 through `torch._dynamo.export` took 125 s here. This tracer
keeps the leaf policy, `call_module` nodes named as in the user's model and `nn_module_stack`,
so every op and rule applies unchanged, in about the time of one forward pass (ResNet-50, 4
images of 224 px: 4.8 s against 5.9 s for the forward, on 2 busy cores).

Only shapes and metadata are specialized. A Python value read from the input's *values*
(`.item()`, `if (x > 0).any()`, `int(x.sum())`) would make the graph right for the example only,
so it is refused (TraceError) rather than baked in, as is a read of a shape that the values
decide (`len(x[x > 0])`). Python values computed from parameters alone (`w.item()`) are
specialized like shapes: a capture is for the weights it saw."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from relprop.core.ops.assign import assign
from relprop.core.trace import (
    OUT_OF_PLACE,
    OUT_OF_PLACE_METHODS,
    LeafPolicy,
    LeafTracer,
    describe_module,
    eval_mode,
    make_out_of_place,
    unshared_input,
)
from relprop.errors import TraceError, first_line

# Calls on a tensor whose Python result describes the tensor, not its values: specialized.
METADATA_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous",
                    "is_floating_point", "is_complex", "element_size", "get_device", "__len__"}
METADATA_FUNCTIONS = {len, torch.numel, torch.is_floating_point, torch.is_complex, torch.is_tensor,
                      getattr, isinstance}


class Held:
    """A tensor computed during capture from no input value (`torch.arange(H)`, a mask built
    from the example's shape): a constant of this capture, held by the graph node rather than
    set on the user's model as plain fx does."""

    def __init__(self, value: Tensor) -> None:
        self.value = value.float() if value.is_floating_point() else value
        self.__name__ = "constant"

    def __call__(self) -> Tensor:
        return self.value

    def __repr__(self) -> str:
        return f"constant{tuple(self.value.shape)}"


class _ValueProxy(fx.Proxy):
    """A proxy that also holds its node's value on the example input (under a name no model
    code reads: a model must never see the example's values)."""

    def __init__(self, node: fx.Node, tracer: _ConcreteTracer, value: Any) -> None:
        super().__init__(node, tracer)
        self._example_value = value

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._example_value, name)  # AttributeError as the tensor itself would raise
        if isinstance(value, Tensor):  # x.T, x.mT, x.real: a node
            return self.tracer.create_proxy("call_function", getattr, (self, name), {})
        if callable(value):  # a method: fx records the call
            return fx.proxy.Attribute(self, name)
        self.tracer.check_shape_read(self.node, f"'.{name}'")
        return value  # shape, dtype, device, ndim: metadata, specialized

    def __len__(self) -> int:
        self.tracer.check_shape_read(self.node, "'len'")
        return len(self._example_value)

    def __setitem__(self, index: Any, value: Any) -> None:
        """`x[index] = value` becomes `x = assign(x, index, value)`: this proxy stands for the new
        node from here on (a view of x taken before would not see the change; the fidelity
        check would)."""
        new = self.tracer.create_proxy("call_function", assign, (self, index, value), {})
        self.node, self._example_value = new.node, new._example_value


def _value_of(item: Any) -> Any:
    return item._example_value if isinstance(item, _ValueProxy) else item


def _has_proxy(tree: Any) -> bool:
    leaves, _ = tree_flatten(tree)
    return any(isinstance(leaf, fx.Proxy) for leaf in leaves)


def _holds_tensor(value: Any) -> bool:
    leaves, _ = tree_flatten(value)
    return any(isinstance(leaf, Tensor) for leaf in leaves)


class _ConcreteTracer(LeafTracer):
    """fx tracing with the example input's values beside the proxies (see the module doc)."""

    def __init__(self, policy: LeafPolicy, example: Tensor) -> None:
        super().__init__(policy)
        self.example = example
        self.eager = 0  # > 0 while computing a value: modules run, parameters are themselves
        self.dependent: set[fx.Node] = set()  # nodes computed from the input
        self.value_shaped: set[fx.Node] = set()  # ... whose shape depends on its values (x[x > 0])
        self.buffers: dict[int, str] | None = None  # the model's buffers by id, once tracing began

    def create_args_for_root(self, root_fn: Callable, is_module: bool, concrete_args: Any = None) -> Any:
        def one_input(module: nn.Module, x: Tensor) -> Any:  # the others keep their defaults
            return root_fn(module, x)

        return super().create_args_for_root(one_input, is_module, concrete_args)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self.eager:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if self.eager:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, Tensor) and not isinstance(a, nn.Parameter):
            if self.buffers is None:
                self.buffers = {id(buffer): name for name, buffer in self.root.named_buffers()}
            if id(a) in self.buffers:  # read live, as the model reads it
                return self.create_node("get_attr", self.buffers[id(a)], (), {})
            if a not in self.tensor_attrs:
                return self.create_node("call_function", Held(a), (), {})
        return super().create_arg(a)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                     type_expr: Any = None, proxy_factory_fn: Callable | None = None) -> Any:
        value = self._evaluate(kind, target, args, kwargs)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        if kind == "placeholder" or any(parent in self.dependent for parent in node.all_input_nodes):
            self.dependent.add(node)
            parents_shaped = any(parent in self.value_shaped for parent in node.all_input_nodes)
            if parents_shaped or _shaped_by_values(kind, target, args):
                self.value_shaped.add(node)
        if kind in ("placeholder", "get_attr") or _holds_tensor(value):
            return _ValueProxy(node, self, value)
        if node in self.dependent and (_is_metadata(kind, target) or _is_structural(kind, target, args)):
            self.value_shaped.discard(node)
            for parent in node.all_input_nodes:
                self.check_shape_read(parent, _call_name(kind, target))
        elif node in self.dependent:
            raise TraceError(
                f"{_call_name(kind, target)} (node '{node.name}') reads a Python {type(value).__name__} "
                "from the input's values; a graph specialized on it would be right for this input only"
            )
        self.dependent.discard(node)
        self.graph.erase_node(node)  # a shape, other metadata or a constant's value: specialized
        return value

    def check_shape_read(self, node: fx.Node, what: str) -> None:
        """A shape read is specialized; one of a tensor whose shape depends on the input's values
        would be the example's only."""
        if node in self.value_shaped:
            raise TraceError(f"{what} reads the shape of '{node.name}', which depends on the input's values "
                             "(a boolean mask, nonzero, unique); a graph specialized on it would be right "
                             "for this input only")

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        self.eager += 1
        try:
            return self._compute(kind, target, *tree_map(_value_of, (args, kwargs)))
        finally:
            self.eager -= 1

    def _compute(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self.example
        if kind == "get_attr":
            value: Any = self.root
            for part in target.split("."):
                value = getattr(value, part)
            return value
        if kwargs.get("inplace"):
            kwargs = {**kwargs, "inplace": False}
        if kind == "call_module":
            module = self.root.get_submodule(target)
            return module(*unshared_input(module, args), **kwargs)
        if kind == "call_method":
            obj, *rest = args
            return getattr(obj, OUT_OF_PLACE_METHODS.get(target, target))(*rest, **kwargs)
        return OUT_OF_PLACE.get(target, target)(*args, **kwargs)

    def to_bool(self, obj: fx.Proxy) -> bool:
        if not isinstance(obj, _ValueProxy):  # `if x.method:` (an fx Attribute): a bound method
            return True
        value = obj._example_value
        if isinstance(value, Tensor) and obj.node in self.dependent:
            raise TraceError(f"Python control flow on the input's values ('{obj.node.name}')")
        return bool(value)

    def iter(self, obj: fx.Proxy) -> Iterator:
        return (obj[i] for i in range(len(_value_of(obj))))


VALUE_SHAPED = {torch.nonzero, torch.masked_select, torch.unique, torch.unique_consecutive, torch.argwhere,
                "nonzero", "masked_select", "unique", "unique_consecutive", "argwhere"}


def _shaped_by_values(kind: str, target: Any, args: tuple) -> bool:
    """Does this call's output shape depend on its input's values (boolean-mask indexing too)?"""
    if kind == "call_function" and target is operator.getitem and len(args) > 1:
        index, _ = tree_flatten(args[1])
        values = [i._example_value for i in index if isinstance(i, _ValueProxy)]
        return any(isinstance(v, Tensor) and v.dtype == torch.bool for v in values)
    return kind in ("call_function", "call_method") and _hashable(target) and target in VALUE_SHAPED


def _hashable(target: Any) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


def _call_name(kind: str, target: Any) -> str:
    if kind == "call_method":
        return f"'.{target}()'"
    if kind == "call_module":
        return f"module '{target}'"
    return f"'{getattr(target, '__name__', target)}'"


def _is_structural(kind: str, target: Any, args: tuple) -> bool:
    """An element of a tuple, list or dict a module returned (`out, weights = attn(x)` with
    weights None): where things are, not what the input's values are."""
    first = args[0] if args else None
    container = isinstance(first, _ValueProxy) and isinstance(first._example_value, (tuple, list, dict))
    return container and (target is operator.getitem or target in ("keys", "values", "items", "get"))


def _is_metadata(kind: str, target: Any) -> bool:
    if kind == "call_method":
        return target in METADATA_METHODS
    return kind == "call_function" and target in METADATA_FUNCTIONS


def trace_on(model: nn.Module, policy: LeafPolicy, example: Tensor, fx_error: TraceError | None = None) -> fx.Graph:
    """The model's graph on inputs shaped like `example`, traced with its values (eval mode,
    in-place ops made out-of-place). `fx_error`: why symbolic tracing failed, for the message."""
    tracer = _ConcreteTracer(policy, example)
    try:
        with eval_mode(model), torch.no_grad():
            graph = tracer.trace(model)
    except Exception as error:  # user code raises anything; all mean "not capturable as written"
        symbolic = f" (torch.fx: {first_line(fx_error.__cause__ or fx_error)})" if fx_error is not None else ""
        raise TraceError(
            f"cannot capture {type(model).__name__}{describe_module(tracer.failed_in)} on inputs of "
            f"shape {tuple(example.shape)}{symbolic}: {first_line(error)}. Make that module a leaf with a "
            "rule (rules={ThatModuleType: rule}) or explain a traceable sub-module."
        ) from error
    make_out_of_place(graph)
    _drop_dead_metadata(graph)
    return graph


def _drop_dead_metadata(graph: fx.Graph) -> None:
    """Remove nodes nothing reads that compute nothing the output needs (getattr or method
    proxies created and then specialized away)."""
    for node in reversed(list(graph.nodes)):
        if node.op in ("call_function", "call_method", "get_attr") and not node.users and not _has_effect(node):
            graph.erase_node(node)


def _has_effect(node: fx.Node) -> bool:
    return node.target in (operator.setitem,) or (isinstance(node.target, str) and node.target.endswith("_"))
