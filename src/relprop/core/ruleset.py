"""The user's rules sorted by key kind, and which graph nodes they cover."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import Tensor, nn

from relprop.core.linear_op import LINEAR_FUNCTIONS
from relprop.core.rules import Rule, get_rule
from relprop.core.trace import module_path
from relprop.errors import ConfigError

if TYPE_CHECKING:
    from relprop.core.plan import Step

RuleSpec = str | Rule


@dataclass(frozen=True)
class RuleSet:
    """The user's rules by key kind: module names, module types, functions, tensor methods."""

    names: dict[str, Rule] = field(default_factory=dict)
    types: dict[type, Rule] = field(default_factory=dict)
    functions: dict[Any, Rule] = field(default_factory=dict)
    methods: dict[str, Rule] = field(default_factory=dict)

    @classmethod
    def sort(cls, model: nn.Module, rules: Mapping[Any, RuleSpec], mean: list[float] | None,
             std: list[float] | None) -> RuleSet:
        """A string key is a module name of this model, else a tensor method; other keys are
        module types or functions."""
        module_names = {name for name, _ in model.named_modules() if name}
        ruleset = cls()
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
                raise ConfigError(f"rule key {key!r} is neither a module type, a module name of this model, "
                                  "a function nor a tensor method name")
        return ruleset

    def all(self) -> list[Rule]:
        return [*self.names.values(), *self.types.values(), *self.functions.values(), *self.methods.values()]

    def by_name(self, node: fx.Node) -> Rule | None:
        """The rule of the module a node is (or, for a functional call, sits in)."""
        path = node.target if node.op == "call_module" else module_path(node)
        return self.names.get(path) if path else None

    def by_kind(self, step: Step, model: nn.Module) -> Rule | None:
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
        elif node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
            candidates.append(LINEAR_FUNCTIONS[node.target])
            path = module_path(node)
            if path:
                candidates.append(type(model.get_submodule(path)))
        return self.by_type(*candidates)

    def by_type(self, *candidates: type) -> Rule | None:
        """The first type rule whose key is one of `candidates` or a base class of one."""
        for layer_type, rule in self.types.items():
            if any(issubclass(candidate, layer_type) for candidate in candidates):
                return rule
        return None
