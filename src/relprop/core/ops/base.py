"""What an op is: the node kind that claims graph nodes and says how relevance crosses them.

An op answers four questions, each a method with a default:
- which nodes are mine? `modules` lists the module classes it reproduces (their exact
  computation: such modules stay graph leaves), `check_module` may refuse a variant of them,
  `claim(node)` takes function and method calls, `claim_module` other modules. A claim may raise
  `UnsupportedLayerError` to refuse a node with its reason, which is raised only if relevance
  ever reaches that node;
- `forward(step, args, kwargs, model)`: the node's output in fp32 and eval semantics (`record`:
  the same, with what its relevance will need from the forward pass);
- `relevance(step, values, R, context)`: the relevance of the node's inputs;
- the graph facts the planner collects: `annotate` (operand roles and the like, in `info`),
  `output_nonnegative`, `relevance_parents`.
Ops are stateless singletons in the registry (`relprop.core.ops.OPS`); what varies per
explainer (rules, strategies, caches) comes in through `context`.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch.fx as fx
from torch import Tensor, nn

from relprop.core.rules import PassRule, Rule
from relprop.core.trace import in_module, unshared_input
from relprop.errors import OpFailure, TraceError, UnsupportedLayerError, first_line

if TYPE_CHECKING:  # types only: the planner imports the ops, not the other way round
    from relprop.core.composites import Strategies
    from relprop.core.plan import Plan, Step
    from relprop.core.ruleset import RuleSet

Relevance = Tensor | list[Tensor | None]  # one tensor, or one per element of a tuple-valued node
Parents = list[tuple[fx.Node, Relevance]]


class Context(Protocol):
    """What an op may ask of the interpreter that runs it."""

    model: nn.Module
    strategies: Strategies
    rules: RuleSet
    step_of: dict[fx.Node, Step]
    cache: dict[Any, Any]

    def rule_for(self, step: Step) -> Rule: ...


class Op:
    """Base class of every node kind. Subclasses set `name` and override what differs."""

    name: ClassVar[str] = "op"
    # the modules whose computation this op reproduces (exact classes and subclasses that keep
    # their forward): such modules stay graph leaves and are claimed here
    modules: ClassVar[tuple[type[nn.Module], ...]] = ()
    # a linear layer behind nodes of this kind still sees the image (reshapes, pass-throughs)
    keeps_the_input_layer: ClassVar[bool] = False
    carries_relevance: ClassVar[bool] = True
    # the calls it claims: functions, tensor-method names, and library functions by importable
    # name (matched without importing the library)
    functions: ClassVar[AbstractSet[Any]] = frozenset()
    methods: ClassVar[AbstractSet[str]] = frozenset()
    library_functions: ClassVar[AbstractSet[str]] = frozenset()

    def claim(self, node: fx.Node) -> bool:
        """A `call_function` or `call_method` node of this kind? By default: one in the op's
        `functions`, `methods` or `library_functions`."""
        if node.op == "call_method":
            return node.target in self.methods
        return node.target in self.functions or (bool(self.library_functions)
                                                 and function_key(node.target) in self.library_functions)

    def check_module(self, node: fx.Node, module: nn.Module) -> None:
        """Refuse a module of `modules` that this op cannot reproduce in this configuration."""

    def claim_module(self, node: fx.Node, module: nn.Module) -> bool:
        """A module outside every op's `modules` that is of this kind all the same?"""
        return False

    def make_info(self) -> Any:
        """The op's own facts about one step (operand roles, folds...), filled by the planner."""
        return None

    def forward(self, step: Step, args: tuple, kwargs: dict, model: nn.Module) -> Any:
        node = step.node
        if node.op == "call_module":
            return step.module(*unshared_input(step.module, args), **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, node.target)(*rest, **kwargs)
        raise TraceError(f"{self.name} cannot run a {node.op} node")

    def record(self, step: Step, args: tuple, kwargs: dict, context: Context) -> tuple[Any, Any]:
        """The node's output and what `relevance` will want from this forward pass (None:
        nothing), which it finds in `values.parts[step.node]`: an op that would otherwise
        recompute parts of its forward for the relevance keeps them here, and only what the
        composite's rules (in `context`) will read. By default: `forward`."""
        return self.forward(step, args, kwargs, context.model), None

    def record_in_place(self, step: Step, args: tuple, kwargs: dict) -> Any | None:
        """The node's output computed into the memory of its first argument, which the engine
        hands over only when that value is fresh (`output_is_fresh`), read by no later step and
        not by the walk; None where the op cannot (the default). Writing into memory that is
        already there is what saves time: a kept output written to fresh memory costs its pages'
        first touch (an elementwise kernel runs about 3× slower into it on the CPU)."""
        return None

    def output_is_fresh(self, step: Step) -> bool:
        """Whether the step's output is memory of its own (not a view or an alias of a value
        some other node holds), so that a consumer may write into it once nothing else reads it."""
        return False

    def relevance(self, step: Step, values: dict[fx.Node, Any], R: Relevance, context: Context) -> Parents:
        raise NotImplementedError

    # Whether `relevance` reads the numbers of no values but its arguments' (shapes it may read of
    # any node; an op that reads its own output says so in `backward_reads`). Ops that say so let
    # the engine release every other value during the forward pass (memory the backward walk does
    # not need); the default keeps all.
    reads_its_arguments: ClassVar[bool] = False
    reads_its_output: ClassVar[bool] = False  # with reads_its_arguments: its own output's numbers too

    def backward_reads(self, step: Step, context: Context) -> list[fx.Node] | None:
        """The nodes whose values (numbers, not only shapes) `relevance` reads; None: any node's.
        An op that overrides this says it all here (its flags are not read)."""
        if not self.reads_its_arguments:
            return None
        return [step.node, *step.node.all_input_nodes] if self.reads_its_output else [*step.node.all_input_nodes]

    def annotate(self, step: Step, plan: Plan) -> None:
        """Record graph facts in `step.info` once every node is claimed."""

    def output_nonnegative(self, step: Step, parents: list[bool]) -> bool:
        """Whether the output is >= 0 by construction, given which inputs are."""
        return False

    def relevance_parents(self, step: Step) -> list[fx.Node]:
        """The inputs relevance flows to (not a gate's)."""
        return step.inputs

    def sees_the_input(self, step: Step) -> bool:
        """A layer that consumes the image itself (where `input_rule` applies)."""
        return False

    def default_rule(self, step: Step, strategies: Strategies) -> Rule:
        """The rule of a step no user rule names: relevance passes unchanged."""
        return PassRule()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class KeepsSign:
    """Mixin: non-negative inputs give a non-negative output (pooling, routing, concatenation)."""

    def output_nonnegative(self, step: Step, parents: list[bool]) -> bool:
        return bool(parents) and all(parents)


def reproduces(module: nn.Module, types: tuple[type[nn.Module], ...]) -> bool | None:
    """Whether a module computes exactly what its torch class in `types` computes: the class
    itself, or a subclass that overrides neither `forward` nor `_conv_forward` (True); a subclass
    with its own forward (timm's StdConv2d, BatchNormAct2d) computes something else (False) and
    is traced into instead; None when no class of `types` is among its bases."""
    if "forward" in vars(module):  # a forward replaced on the instance
        return False
    base = next((t for t in type(module).__mro__ if t in types), None)
    if base is None:
        return None
    return all(getattr(type(module), attr, None) is getattr(base, attr, None)
               for attr in ("forward", "_conv_forward"))


def function_key(function: Any) -> str:
    """The importable name of a function (what a user writes as a rule key)."""
    module = getattr(function, "__module__", None) or "torch"
    name = getattr(function, "__name__", repr(function))
    if module == "_operator":
        module = "operator"
    return f"{module}.{name}"


def type_key(layer_type: type) -> str:
    """The importable name of a module type."""
    module = layer_type.__module__
    if module.startswith("torch.nn.modules"):
        return f"torch.nn.{layer_type.__name__}"
    return f"{module}.{layer_type.__qualname__}"


def describe(node: fx.Node, module: nn.Module | None) -> str:
    """How an error names a node: the module, function or tensor method, and where it sits."""
    if node.op == "call_module":
        return f"module '{node.target}' ({type(module).__name__})"
    if node.op == "call_function":
        return f"function '{function_key(node.target)}' (node '{node.name}'{in_module(node)})"
    return f"tensor method '.{node.target}()' (node '{node.name}'{in_module(node)})"


def rule_key(node: fx.Node, module: nn.Module | None) -> str:
    """The key of `rules={key: rule}` that would give this node a rule."""
    if node.op == "call_module":
        return type_key(type(module))
    if node.op == "call_function":
        return function_key(node.target)
    return repr(node.target)


def unsupported(what: str, key: str, inputs: int = 1) -> UnsupportedLayerError:
    """The one refusal text: what has no rule, and the importable key that gives it one. A call
    that combines several input-dependent tensors needs an op: a rule sends all relevance to
    its first input, so that advice would lead into a wrong map or a failure."""
    if inputs > 1:
        return UnsupportedLayerError(
            f"relprop has no relevance rule for {what}, which combines {inputs} input-dependent tensors; "
            f"a rule (rules={{{key}: rule}}) would send all relevance to the first of them, so it needs an op "
            "of its own (docs/architecture.md, 'Adding an op')"
        )
    return UnsupportedLayerError(
        f"relprop has no relevance rule for {what}; pass rules={{{key}: rule}} to LRP(...) "
        "with a rule name ('pass' for elementwise maps, 'proportional' for positive linear maps "
        "such as pooling, 'zplus', ...) or a relprop.core.rules.Rule"
    )


def positional(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """An argument of a call by keyword or position, as fx recorded it."""
    return node.kwargs.get(name, node.args[index] if len(node.args) > index else default)


def op_failure(node: fx.Node, module: nn.Module | None, op: str, action: str, error: BaseException) -> OpFailure:
    """The one line for an op that failed on a node it claimed (its cause is `error`)."""
    return OpFailure(
        f"relprop's {op} op failed to {action} {describe(node, module)}: {first_line(error)}; please report "
        f"this (a rule, rules={{{rule_key(node, module)}: rule}}, may work around it)"
    )
