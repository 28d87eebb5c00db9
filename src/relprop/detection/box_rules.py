"""What a box map is: the definitions of box-output relevance CRP offers, by name.

The direction check (`relprop.evaluation.detection.direction_check`, `benchmarks/box_direction.py`)
asks whether removing a box map's most positive pixels moves its output down and its most negative
pixels moves it up. The seed's split and the signed head with z+ below conserve but fail its
negative side; LRP-0 below a signed head (the norms' std held constant) passes both sides on the
SSD, FCOS and RetinaNet, on YOLO's DFL head its positive side only, and does not conserve
(docs/crp.md, docs/results.md). Each definition carries the line a panel prints under its box
maps (per family where one measured otherwise), so a reader is told what the colours can be read as.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relprop.core.composites import Composite


@dataclass(frozen=True)
class BoxRule:
    """How a box output's relevance is defined: the rule at the box head, the composite below it
    (None: the class maps'), and the one line a panel shows about what the map can be read as
    (measured by the direction check, docs/crp.md)."""

    head: str  # "split": R+ - R- (each part normalized to 1); "signed": each input's contribution
    summary: str
    caveat: str
    composite: Callable[[], Composite] | None = None
    family_caveats: Mapping[str, str] = field(default_factory=dict)  # where a family measured otherwise

    def caveat_for(self, family: str) -> str:
        """The panel line for a detector family: its own where its direction check differed."""
        return self.family_caveats.get(family, self.caveat)


def lrp0_norm_composite() -> Composite:
    """LRP-0 below a signed box head, with GroupNorm/LayerNorm as the linear maps they are with
    their std held constant: gradient x input of that forward (tests/test_crp_dense.py)."""
    from torch import nn  # deferred: `relprop detect --help` lists the rules without torch

    from relprop.core.composites import Composite  # deferred: torch
    from relprop.core.rules import EpsilonRule, NormEpsilonRule  # deferred: torch
    from relprop.core.splitting import SignedSplit  # deferred: torch

    z_rule, norm = EpsilonRule(0.0), NormEpsilonRule(0.0)
    return Composite(rules={nn.Conv2d: z_rule, nn.Linear: z_rule, nn.GroupNorm: norm, nn.LayerNorm: norm},
                     input_rule=z_rule, maxpool="wta", split=SignedSplit(epsilon=0.0))


NOT_DIRECTIONAL = ("box maps: where the box head's evidence sits; removing their most negative pixels does not "
                   "move the output the other way (direction check, docs/crp.md)")
BOX_RULES: dict[str, BoxRule] = {
    "split": BoxRule(
        "split", "the seed's R+ - R- at the box head, the class maps' z+ composite below; conserving "
        "(each part sums to 1); its negative side fails the direction check",
        NOT_DIRECTIONAL),
    "signed": BoxRule(
        "signed", "each input's signed contribution at the box head, z+ below; conserving (sums to the "
        "output minus the head's bias); its negative side fails the direction check",
        NOT_DIRECTIONAL),
    "lrp0": BoxRule(
        "signed", "signed box head with LRP-0 below (norms' std held constant): passes the direction "
        "check on both sides (SSD, RetinaNet, FCOS; YOLO: its positive side); not conserving: the "
        "backbone's biases absorb most of the sum",
        "box maps: red/blue push the output up/down (direction check passes); their sum is not the output: "
        "biases absorb it (docs/crp.md)",
        lrp0_norm_composite,
        {"yolo": "box maps: red pushes the output up (direction check passes); blue does not reliably push it down "
                 "on YOLO's DFL head (b, r fail), nor does gradient x input; biases absorb the sum (docs/crp.md)"}),
}
"""The box-output definitions by name (``CRP(box_rule=...)``, ``relprop detect --box-rule``)."""
