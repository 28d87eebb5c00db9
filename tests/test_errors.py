"""Unsupported layers and untraceable models fail at construction with one clear line; every
error relprop raises on purpose is a RelpropError."""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest
import torch
from torch import nn

from relprop import LRP
from relprop.errors import TraceError, UnsupportedLayerError


class WithSoftplus(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softplus())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class WithControlFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.gate(x).mean((2, 3)))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return x
        return -x


class WithSineFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return torch.sin(self.conv(x)).mean((2, 3))


def test_unsupported_module_is_named_with_the_fix():
    with pytest.raises(UnsupportedLayerError) as info:
        LRP(WithSoftplus())
    message = str(info.value)
    assert "'features.1' (Softplus)" in message and "rules={torch.nn.Softplus:" in message
    assert "\n" not in message


def test_untraceable_model_names_the_module():
    explainer = LRP(WithControlFlow())  # torch.fx fails; the capture path reads the values: refused
    with pytest.raises(TraceError) as info:
        explainer.attribute(torch.randn(1, 3, 4, 4))
    message = str(info.value)
    assert "in module 'gate' (Gate)" in message and "rules={" in message and "input's values" in message
    assert "\n" not in message


def test_unsupported_function_is_named():
    with pytest.raises(UnsupportedLayerError, match="function 'torch.sin'"):
        LRP(WithSineFunction())


def test_model_that_is_not_a_classifier_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 2, 3))
    with pytest.raises(Exception, match=r"\(N, num_classes\) outputs"):
        LRP(model).attribute(torch.randn(1, 3, 8, 8))


PACKAGE = Path(__file__).resolve().parents[1] / "src" / "relprop"
BUILTIN_ERRORS = {name for name, value in vars(builtins).items()
                  if isinstance(value, type) and issubclass(value, BaseException)}


def _bare_builtin_raises(path: Path) -> list[str]:
    """`raise <builtin exception>(...)` in a file, except the two idioms that must stay builtins:
    a bare `raise NotImplementedError` (an abstract method) and `AttributeError` in a module's
    `__getattr__` (Python's attribute protocol)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_getattr = {id(node) for function in ast.walk(tree)
                  if isinstance(function, ast.FunctionDef) and function.name == "__getattr__"
                  for node in ast.walk(function)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Raise) or node.exc is None:
            continue
        called = isinstance(node.exc, ast.Call)
        name = getattr(node.exc.func if called else node.exc, "id", None)
        if name not in BUILTIN_ERRORS:
            continue
        if name == "NotImplementedError" and not (called and (node.exc.args or node.exc.keywords)):
            continue
        if name == "AttributeError" and id(node) in in_getattr:
            continue
        found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} raise {name}")
    return found


def test_every_deliberate_error_is_a_relprop_error():
    """relprop.errors promises that every error relprop raises on purpose is a RelpropError (whose
    subclasses also derive from the builtin a caller may catch, e.g. ConfigError from ValueError)."""
    found = [hit for path in sorted(PACKAGE.rglob("*.py"))
             for hit in sorted(_bare_builtin_raises(path), key=lambda h: int(h.split(":")[1].split()[0]))]
    assert found == [], "builtin exceptions raised on purpose; raise a relprop.errors class:\n" + "\n".join(found)
    assert _bare_builtin_raises(PACKAGE / "errors.py") == []  # the walk reads real files
