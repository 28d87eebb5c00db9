"""Canonizers: passes over the plan that rewrite what a rule sees, run once when an explainer is
built. `BatchNormFolding` pairs every BatchNorm with the linear layer next to it, so that the
layer's rule sees the effective (folded) layer and the BatchNorm passes relevance through, as
the LRP literature canonizes (`W' = W·s`, `b' = (b − μ)·s + β`; the folding itself is
`relprop.core.linear_op.fold_batchnorm`, done by the linear op on its cached map)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch.fx as fx

from relprop.core.ops.linear import Linear
from relprop.core.ops.meta import Meta
from relprop.core.ops.passthrough import is_foldable_batchnorm

if TYPE_CHECKING:
    from relprop.core.plan import Plan


class Canonizer(Protocol):
    def apply(self, plan: Plan) -> None: ...


@dataclass(frozen=True)
class BatchNormFolding:
    """conv→BN and BN→conv pairs with nothing else reading the value between them. Reads of
    its shape alone (timm's BatchNormAct2d asserts `x.ndim == 4`) see no value and do not count:
    counting them left those BatchNorms unfolded under bn="fold", silently."""

    def apply(self, plan: Plan) -> None:
        for step in plan.steps:
            if not isinstance(step.op, Linear) or len(step.inputs) != 1:
                continue
            after = _value_readers(plan, step.node)
            if len(after) == 1 and is_foldable_batchnorm(plan.step_of[after[0]]) \
                    and plan.step_of[after[0]].inputs == [step.node]:
                step.info.fold_after = after[0]
                plan.step_of[after[0]].info.folded_into = step.node
            before = plan.step_of[step.inputs[0]]
            if is_foldable_batchnorm(before) and _value_readers(plan, before.node) == [step.node] \
                    and before.info.folded_into is None and len(before.inputs) == 1:
                step.info.fold_before = before.node
                before.info.folded_into = step.node


def _value_readers(plan: Plan, node: fx.Node) -> list[fx.Node]:
    """The steps that read `node`'s values (its shape readers left out)."""
    return [child for child in plan.consumers.get(node, []) if not isinstance(plan.step_of[child].op, Meta)]


# bn= of a Composite: the canonizers each mode runs
BN_MODES: dict[str, tuple[Canonizer, ...]] = {"pass": (), "fold": (BatchNormFolding(),)}
