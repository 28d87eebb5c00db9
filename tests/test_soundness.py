"""Soundness: a model is explained exactly or refused with one line, never a silently wrong map or
a traceback. Every value the walk holds fixed is proven independent of the input (the fidelity
check's dependency audit); a module applied several times reports one cut per call; an op or a
rule that fails becomes one `RelpropError` line naming the node."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
from torch import nn

from relprop import LRP
from relprop.core.ops import OPS
from relprop.core.ops.base import Op
from relprop.core.ops.meta import Meta
from relprop.core.rules import Rule
from relprop.errors import (
    ConfigError,
    FidelityError,
    OpFailure,
    RelpropError,
    UnsupportedLayerError,
)


def _probability(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(x), 1).max(1).values


@pytest.fixture
def registered():
    """Register ops for one test only (the registry is global), asked before the built-in ones."""
    added: list[Op] = []

    def register(op: Op) -> Op:
        OPS.insert(0, op)
        added.append(op)
        return op

    yield register
    for op in added:
        OPS.remove(op)


# ------------------------------------------------------------------ the dependency audit


class PoolMixer(nn.Module):
    """PoolFormer's token mixer `pool(x) - x` in a small classifier: the subtracted branch carries
    relevance (an op that took the subtraction for shape arithmetic would cut it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.pool, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(3, 1, 1), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + (self.pool(h) - h)
        return self.head(h.mean((2, 3)))


class SubtractionAsShape(Meta):
    """The old bug, as an op: `operator.sub` claimed among the shape reads."""

    name = "sub-as-shape"
    functions, methods, library_functions = frozenset({operator.sub}), frozenset(), frozenset()


def test_an_op_that_cuts_an_input_dependent_value_is_refused_by_the_audit(registered):
    registered(SubtractionAsShape())
    torch.manual_seed(0)
    model, x = PoolMixer().eval(), torch.randn(2, 3, 8, 8)
    lrp = LRP(model)
    assert any(step.op.name == "sub-as-shape" for step in lrp.engine.plan.held_constant())
    # without the audit this conserved exactly while the pooled branch got no relevance
    with pytest.raises(FidelityError, match=r"'operator.sub' \(node 'sub'.*changes with the input") as info:
        lrp.attribute(x)
    assert "\n" not in str(info.value)


class Remember(nn.Module):
    """Keeps a statistic of its input as state (a dependence the graph does not show)."""

    def forward(self, x):
        self.last = x.mean((1, 2, 3))
        return x


class ScaledTable(nn.Module):
    """Called on a constant table, but reads the remembered statistic."""

    def __init__(self, source: Remember) -> None:
        super().__init__()
        self.source = [source]  # not a submodule: no second path in the graph

    def forward(self, table):
        return table * self.source[0].last.reshape(-1, 1, 1, 1)


class HiddenDependence(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.remember, self.conv, self.head = Remember(), nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)
        self.register_buffer("table", torch.randn(1, 4, 8, 8))
        self.scaled = ScaledTable(self.remember)

    def forward(self, x):
        h = torch.relu(self.conv(self.remember(x)))
        return self.head((h + self.scaled(self.table)).mean((2, 3)))


def test_a_module_on_a_constant_that_depends_on_the_input_through_state_is_refused():
    torch.manual_seed(0)
    model, x = HiddenDependence().eval(), torch.randn(2, 3, 8, 8)
    lrp = LRP(model, rules={Remember: "pass", ScaledTable: "pass"})
    with pytest.raises(FidelityError, match=r"module 'scaled' \(ScaledTable\).*changes with the input"):
        lrp.attribute(x)


class PositionBias(nn.Module):
    """Swin v2's continuous position bias: an MLP applied to a constant coordinate table, and a
    table built from the input's shape; both are constants that the audit must let through."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 16, 3)
        self.register_buffer("coords", torch.randn(16, 2))
        self.mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(2)  # (N, 4, 16)
        ramp = torch.arange(h.shape[-1], dtype=h.dtype) / h.shape[-1]
        return self.head((h + self.mlp(self.coords).t() + ramp).flatten(1))


def test_a_module_applied_to_a_constant_table_is_a_proven_constant():
    torch.manual_seed(0)
    model, x = PositionBias().eval(), torch.randn(2, 3, 4, 4)
    lrp = LRP(model)
    held = {step.node.name for step in lrp.engine.plan.held_constant()}
    assert {"coords", "mlp_0", "mlp_2", "arange"} <= held
    R, sums = lrp.attribute(x, return_layer_sums=True)
    for total in sums.values():
        torch.testing.assert_close(total, _probability(model, x))


def noise(rows: int) -> torch.Tensor:
    return torch.rand(rows, 4)


torch.fx.wrap("noise")  # a graph node, run on every forward pass


class Jitter(nn.Module):
    """A constant that differs on every run (random, multiplied away): not an input dependence."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.head(h + 0.0 * noise(h.shape[0]))


def test_a_constant_that_changes_on_every_run_is_not_taken_for_an_input_dependence():
    torch.manual_seed(0)
    model, x = Jitter().eval(), torch.randn(2, 3, 8, 8)
    R = LRP(model).attribute(x)
    torch.testing.assert_close(R.sum((1, 2, 3)), _probability(model, x))


# ------------------------------------------------------------------ a module applied several times


class Reused(nn.Module):
    """One dropout module applied after each of three convs (timm's visformer: `pos_drop`), and
    one conv applied to two halves whose results are added (no single call is a cut)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.drop, self.shared, self.head = nn.Dropout(0.1), nn.Conv2d(2, 4, 1), nn.Linear(4, 3)

    def forward(self, x):
        x = self.drop(torch.relu(self.c1(x)))
        x = self.drop(torch.relu(self.c2(x)))
        x = self.drop(torch.relu(self.c3(x)))
        x = torch.relu(self.shared(x[:, :2]) + self.shared(x[:, 2:]))
        return self.head(x.mean((2, 3)))


def test_a_module_applied_three_times_reports_each_call_once():
    torch.manual_seed(0)
    model, x = Reused().eval(), torch.rand(2, 3, 8, 8)
    _, sums = LRP(model).attribute(x, return_layer_sums=True)
    assert {"drop#1", "drop#2", "drop#3"} <= set(sums)
    assert "drop" not in sums and not any(name.startswith("shared") for name in sums)  # parallel calls: no cut
    p = _probability(model, x)
    for name, total in sums.items():  # every cut carries the whole relevance, once (was 3p at 'drop')
        torch.testing.assert_close(total, p, msg=name)


def test_the_relevance_of_one_call_of_a_reused_module_is_asked_for_by_its_report_name():
    torch.manual_seed(0)
    model, x = Reused().eval(), torch.rand(2, 3, 8, 8)
    lrp = LRP(model)
    with pytest.raises(ConfigError, match=r"'drop' is applied 3 times; name one call, 'drop#1' to 'drop#3'"):
        lrp.attribute(x, layers=["drop"])  # was: the first call's relevance, silently
    _, sums, kept = lrp.attribute(x, return_layer_sums=True, layers=["drop#1", "drop#3"])
    for name in ("drop#1", "drop#3"):
        torch.testing.assert_close(kept[name].flatten(1).sum(1), sums[name])
    assert not torch.allclose(kept["drop#1"].sum((2, 3)), kept["drop#3"].sum((2, 3)))


# ------------------------------------------------------------------ no traceback


class BranchDistances(nn.Module):
    """Two branches joined by their pairwise distances: a call of two input-dependent tensors
    that no op claims and whose output has another shape than either (torch.stack, skresnet's
    join and this test's first example, has an op since)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), nn.Linear(4, 3)

    def forward(self, x):
        joined = torch.cdist(torch.relu(self.a(x)).flatten(2), torch.relu(self.b(x)).flatten(2))
        return self.head(joined.mean(1))


def test_a_call_of_several_inputs_is_refused_without_advice_that_cannot_work():
    model, x = BranchDistances().eval(), torch.rand(2, 3, 8, 8)
    with pytest.raises(UnsupportedLayerError, match="combines 2 input-dependent tensors") as info:
        LRP(model).attribute(x)
    assert "needs an op" in str(info.value) and "\n" not in str(info.value)
    # following a rule anyway gives a refusal naming the call, not a reshape traceback
    with pytest.raises(UnsupportedLayerError, match=r"rule PassRule\(\) for function 'torch.functional.cdist'") as info:
        LRP(model, rules={torch.cdist: "pass"}).attribute(x)
    assert "needs an op" in str(info.value) and "\n" not in str(info.value)


def double(x):
    return 2 * x


torch.fx.wrap("double")


class Doubling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(double(torch.relu(self.conv(x))).mean((2, 3)))


class Broken(Op):
    """An op that fails where it is told to, with errors that are not relprop's."""

    name = "broken"
    functions = frozenset({double})

    def __init__(self, where: str) -> None:
        self.where = where

    def annotate(self, step, plan):
        if self.where == "annotate":
            raise KeyError("no such operand")

    def forward(self, step, args, kwargs, model):
        if self.where == "forward":
            missing = None
            return missing(args[0])  # TypeError: 'NoneType' object is not callable
        return 2 * args[0]

    def relevance(self, step, values, R, context):
        if self.where == "relevance":
            raise IndexError("list index out of range")
        return [(step.inputs[0], R)]


@pytest.mark.parametrize("where, error", [("annotate", "KeyError"), ("forward", "TypeError"),
                                          ("relevance", "IndexError")])
def test_an_op_that_fails_gives_one_line_naming_the_node(registered, where, error):
    registered(Broken(where))
    torch.manual_seed(0)
    with pytest.raises(OpFailure, match=r"relprop's broken op failed to .*function '.*double'") as info:
        LRP(Doubling().eval()).attribute(torch.rand(2, 3, 8, 8))
    assert "\n" not in str(info.value) and type(info.value.__cause__).__name__ == error


class Crashing(Rule):
    def relevance(self, layer, a, R):
        raise ZeroDivisionError("float division by zero")


def test_a_rule_that_fails_gives_one_line_naming_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    with pytest.raises(RelpropError, match=r"failed to propagate relevance through module '3' \(Linear\)") as info:
        LRP(model, rules={nn.Linear: Crashing()}).attribute(torch.rand(2, 3, 8, 8))
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_a_claim_that_fails_gives_one_line_naming_the_node(registered):
    class ClaimsBadly(Op):
        name = "claims-badly"

        def claim(self, node):
            if node.op == "call_function" and node.target is double:
                raise AttributeError("'NoneType' object has no attribute 'args'")
            return False

    registered(ClaimsBadly())
    with pytest.raises(OpFailure, match=r"planner op failed to claim function '.*double'") as info:
        LRP(Doubling().eval())
    assert isinstance(info.value.__cause__, AttributeError)


class FoldedBatch(nn.Module):
    """Rows of B·N tokens, batch-major, through a module (TNT's pixel tokens): its cut's
    relevance has B·N rows, one sample's tokens after another."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.tokens, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        b, c, height, width = h.shape
        rows = self.tokens(h.permute(0, 2, 3, 1).reshape(b * height * width, c))
        return self.head(torch.relu(rows).reshape(b, height * width, c).mean(1))


def test_layer_sums_of_a_value_with_the_batch_folded_in_are_per_sample():
    torch.manual_seed(0)
    model, x = FoldedBatch().eval(), torch.rand(3, 3, 5, 5)
    R, sums = LRP(model).attribute(x, return_layer_sums=True)
    probability = torch.softmax(model(x), 1).max(1).values
    assert sums["tokens"].shape == (3,)
    torch.testing.assert_close(sums["tokens"], probability, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(R.sum((1, 2, 3)), probability, rtol=1e-4, atol=1e-6)
