"""relprop's LRP methods: each is a named composite (`relprop.core.composites`) and a name."""

from __future__ import annotations

from typing import Any

from torch import nn

from relprop.core.composites import COMPOSITE_FIELDS, Composite, get_composite
from relprop.core.lrp import LRP, preset_reference
from relprop.methods.base import Method, MethodOptions
from relprop.methods.registry import register

# method name -> composite name, and the paper-style alias the tables were written under
LRP_VARIANTS: dict[str, str] = {
    "lrp-split": "lrp-split",  # the paper's method
    "lrp-split-sym": "lrp-split-sym",
    "lrp-split-noid": "lrp-split-noid",
    "lrp-split-sym-noid": "lrp-split-sym-noid",
    "lrp-split-ref": "lrp-split-ref",  # the authors' code's numerics
    "lrp-plain": "lrp-plain",  # the signed split: plain LRP
    "cp-lrp": "cp-lrp",  # LXT's choices for transformers (ε, CP attention, LayerNorm's std constant)
    "attnlrp": "attnlrp",  # AttnLRP (Achtibat et al. 2024)
}
PAPER_ALIASES = {"ours": "lrp-split", "ours-sym": "lrp-split-sym", "ours-noid": "lrp-split-noid",
                 "ours-sym-noid": "lrp-split-sym-noid", "ours-ref": "lrp-split-ref"}


class LRPMethod(Method):
    """relprop's LRP (the core's `relprop.LRP`) with one composite."""

    is_lrp = True

    def __init__(self, model: nn.Module, name: str, composite: Composite | None = None, **lrp_kwargs: Any) -> None:
        super().__init__(model, name)
        self.lrp = LRP(model, composite=composite, **lrp_kwargs)

    def attribute(self, inputs, target=None, return_layer_sums: bool = False):
        """The core takes None, class indices or an (N, num_outputs) seed as `target`."""
        return self.lrp.attribute(inputs, target=target, return_layer_sums=return_layer_sums)


def composite_method(composite_name: str):
    """The builder of an LRP method: the named composite with the normalization, changed by
    any composite fields among the keywords (`preset` as its `reference`); the other keywords
    (chunk_size, verify) go to `relprop.LRP`."""

    def build(model: nn.Module, name: str, options: MethodOptions) -> LRPMethod:
        composite = get_composite(composite_name, mean=options.mean, std=options.std)
        lrp_kwargs = dict(options.lrp)
        if "preset" in lrp_kwargs:
            lrp_kwargs["reference"] = preset_reference(lrp_kwargs.pop("preset"))
        changes = {key: lrp_kwargs.pop(key) for key in list(lrp_kwargs) if key in COMPOSITE_FIELDS}
        changes = {key: value for key, value in changes.items() if value is not None}
        return LRPMethod(model, name, composite.replace(**changes), **lrp_kwargs)

    return build


_ALIAS_OF = {canonical: alias for alias, canonical in PAPER_ALIASES.items()}
for _name, _composite in LRP_VARIANTS.items():
    register(_name, composite_method(_composite), aliases=[_ALIAS_OF[_name]] if _name in _ALIAS_OF else [],
             takes_lrp_options=True)
