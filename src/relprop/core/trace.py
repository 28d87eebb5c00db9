"""Tracing a model into a `torch.fx` graph: the leaf policy, eval mode, in-place ops made
out-of-place, and where a failure happened."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from relprop.errors import TraceError, first_line

# In-place variants would overwrite activations that relevance rules still need.
OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                operator.itruediv: operator.truediv}
OUT_OF_PLACE_METHODS = {"relu_": "relu", "add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div"}


@dataclass(frozen=True)
class LeafPolicy:
    """Which modules stay graph leaves: those an op reproduces (`is_builtin`), and those the
    user gave a rule, by type or by name, unless they are layer classes the ops run themselves
    (`builtin_types`: their subclasses are traced into, so the rule meets their operations)."""

    is_builtin: Callable[[nn.Module], bool]
    builtin_types: tuple[type, ...] = ()
    ruled_types: tuple[type, ...] = ()
    ruled_names: frozenset[str] = frozenset()

    def user_leaf_types(self) -> tuple[type, ...]:
        return tuple(t for t in self.ruled_types if not issubclass(t, self.builtin_types))

    def is_user_leaf(self, module: nn.Module, name: str) -> bool:
        if isinstance(module, self.user_leaf_types()):
            return True
        return name in self.ruled_names and not isinstance(module, self.builtin_types)

    def is_leaf(self, module: nn.Module, name: str) -> bool:
        return self.is_builtin(module) or self.is_user_leaf(module, name)


class LeafTracer(fx.Tracer):
    """fx tracer that keeps the policy's modules as leaves and remembers where it is, so a
    failure can name the module it happened in."""

    def __init__(self, policy: LeafPolicy) -> None:
        super().__init__()
        self.policy = policy
        self.relprop_path: list[tuple[str, nn.Module]] = []
        self.failed_in: tuple[str, nn.Module] | None = None  # innermost module of a failure

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return self.policy.is_leaf(m, module_qualified_name) or super().is_leaf_module(m, module_qualified_name)

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


def trace(model: nn.Module, policy: LeafPolicy) -> fx.Graph:
    """The model's graph, traced in eval mode, with in-place ops replaced by their out-of-place
    twins."""
    tracer = LeafTracer(policy)
    try:
        with eval_mode(model):
            graph = tracer.trace(model)
    except Exception as error:  # fx raises many types; all mean "not traceable as written"
        raise TraceError(
            f"cannot trace {type(model).__name__}{describe_module(tracer.failed_in)} with torch.fx: "
            f"{first_line(error)}. Make that module a leaf with a rule (rules={{ThatModuleType: rule}}) "
            "or explain a traceable sub-module."
        ) from error
    make_out_of_place(graph)
    return graph


def unshared_input(module: nn.Module, args: tuple) -> tuple:
    """`args`, with the first one copied when `module` computes in place (nn.ReLU(inplace=True),
    nn.Hardswish(inplace=True)...): it would overwrite the value recorded for its input, which
    an ε step reads as its denominator. Always a copy: a value released after this call can
    still alias a kept one (nn.Identity returns its input; MobileNetV3's norm_head). Applied
    where a module is called, not to ops that compute its function out of place themselves
    (ReLU, BatchNorm: a copy there was 10 ms of ResNet-50's 210 ms recording forward)."""
    if getattr(module, "inplace", False) is True and args and isinstance(args[0], torch.Tensor):
        return (args[0].clone(), *args[1:])
    return args


def make_out_of_place(graph: fx.Graph) -> None:
    """Replace in-place ops by their out-of-place twins, in place. A tensor method or function
    called in place changes the tensor itself, so the nodes after it that read that tensor read
    the op's result instead: timm's NaFlexEmbeds calls `x.add_(pos_embed)` and goes on with `x`
    (out of place and unread, the position embedding was lost). `x += y` (operator.iadd) rebinds
    the name to its result, as it must for a number, which has no in-place form."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        mutates = False
        if node.op == "call_function" and node.target in OUT_OF_PLACE:
            node.target = OUT_OF_PLACE[node.target]
        elif node.op == "call_method" and node.target in OUT_OF_PLACE_METHODS:
            node.target, mutates = OUT_OF_PLACE_METHODS[node.target], True
        if node.kwargs.get("inplace"):
            node.kwargs, mutates = {**node.kwargs, "inplace": False}, node.op == "call_function"
        changed = node.args[0] if node.args else None
        if mutates and isinstance(changed, fx.Node):
            for reader in [user for user in changed.users if order[user] > order[node]]:
                reader.replace_input_with(changed, node)


def describe_module(failed_in: tuple[str, nn.Module] | None) -> str:
    if failed_in is None:
        return ""
    name, module = failed_in
    return f" in module '{name}' ({type(module).__name__})"


def module_path(node: fx.Node) -> str:
    """The qualified name of the innermost module a node was traced in ("" at the top)."""
    stack = node.meta.get("nn_module_stack", {})
    return next(reversed(stack.values()))[0] if stack else ""


def in_module(node: fx.Node) -> str:
    path = module_path(node)
    return f" in module '{path}'" if path else ""
