"""`Composite`: which rule where, how residual adds split, and the numerics, as one object.

`LRP`, `RelevanceEngine` and `CRP` take a composite (``composite=``) or its fields as keyword
arguments (a shortcut that builds one). Its policies are strategy objects (``split=RatioSplit()``,
``maxpool=WinnerTakesAll()``, ``attention=ConservativeAttention()``, ``constants=KeepOnInput()``)
or their names (``"ratio"``, ``"wta"``, ``"cp"``, ``"input"``); `strategies()` resolves them, with
the reference code's numerics where ``reference=True``, into the `Strategies` the engine uses.
Named composites live in a registry:

    >>> from relprop import get_composite, composite_names
    >>> get_composite("lrp-split-sym").split
    'symmetric'
    >>> "epsilon-gamma-box" in composite_names()
    True

Adding a composite: one `register_composite(name, factory, summary)` line (a function of the
input normalization, `(mean, std) -> Composite`, and one line for the docs), here or in your own
code. docs/rules.md's list of named composites is generated from the registry
(`python tools/make_docs.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from relprop.core.canonize import BN_MODES, Canonizer
from relprop.core.constants import ConstantsPolicy, constants_policy
from relprop.core.ops.attention import AttentionStrategy, attention_strategy
from relprop.core.ops.maxpool import MaxPoolStrategy, maxpool_strategy
from relprop.core.rules import (
    ProportionalRule,
    ReferenceZPlusRule,
    Rule,
    WPlusRule,
    ZPlusRule,
    get_rule,
)
from relprop.core.ruleset import RuleSet, RuleSpec
from relprop.core.splitting import SplitStrategy, split_strategy
from relprop.errors import ConfigError, InputError

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class Strategies:
    """A composite resolved for one model: every choice the ops and the engine act on."""

    split: SplitStrategy
    identity_skips: bool
    maxpool: MaxPoolStrategy
    pooling: Rule  # positive linear maps (pooling, upsampling, the max pool's stand-in)
    attention: AttentionStrategy
    constants: ConstantsPolicy
    default_rule: Rule  # linear layers without a rule of their own
    default_input_rule: Rule  # the layer that sees the image, without a rule of its own
    input_rule: Rule | None  # the user's rule for that layer (wins over type rules)
    bn: str  # "pass" or "fold": which canonizers run

    @property
    def canonizers(self) -> tuple[Canonizer, ...]:
        return BN_MODES[self.bn]


@dataclass(frozen=True)
class Composite:
    """Every choice that decides the relevance, apart from the model.

    Args:
        rules: module types, qualified module names, functions or tensor-method names -> rule
            name or `Rule` (``{nn.Linear: "epsilon", "layer4.1.conv2": "gamma"}``); kept as a
            tuple of pairs so the composite stays immutable (`rule_map()` gives the dict).
        input_rule: rule of the layer that sees the input (None: a type rule if one matches
            there, else w⁺).
        split: ``"ratio"`` (the paper), ``"symmetric"`` or ``"signed"`` (plain LRP), or a split
            strategy (`relprop.core.splitting`).
        identity_skips: split at identity skips too (False: the paper's ablation).
        maxpool: ``"avg"`` (proportional, the pool's geometry) or ``"wta"`` (winner takes all),
            or a max-pool strategy (`relprop.core.ops.maxpool`).
        bn: ``"fold"``, ``"pass"`` or None (pass for rules that declare `bn_invariant`, such as
            the paper's z+/w⁺; fold for any other rule).
        reference: the authors' code's numerics (reproduces their numbers; leaks a few percent):
            the reference twin of every named strategy (their split arithmetic, a 2×2 average for
            max pooling, +1e-5 in pooling and z+, ones at the input layer).
        attention: ``"cp"`` (attention weights held constant, Ali et al. 2022: conserves) or
            ``"attnlrp"`` (AttnLRP's softmax and bilinear rules, Achtibat et al. 2024), or an
            attention strategy (`relprop.core.ops.attention`).
        constants: where the relevance of a constant operand (ViT's class token and position
            embedding, a bias added by a function) goes: ``"input"`` (kept by the input-dependent
            operand: all of it at an add, the cat's constant slices rescale the others) or
            ``"leak"`` (the constant takes its share and the relevance is lost there), or a
            policy (`relprop.core.constants`).
        mean, std: the input normalization, which the zB rule needs.
    """

    rules: Mapping[Any, RuleSpec] | tuple[tuple[Any, RuleSpec], ...] = ()
    input_rule: RuleSpec | None = None
    split: str | SplitStrategy = "ratio"
    identity_skips: bool = True
    maxpool: str | MaxPoolStrategy = "avg"
    bn: str | None = None
    reference: bool = False
    attention: str | AttentionStrategy = "cp"
    constants: str | ConstantsPolicy = "input"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        pairs = tuple(self.rules.items()) if isinstance(self.rules, Mapping) else tuple(self.rules)
        object.__setattr__(self, "rules", pairs)
        for name in ("mean", "std"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else tuple(float(v) for v in value))
        if self.bn is not None and self.bn not in BN_MODES:
            raise ConfigError(f"unknown bn mode {self.bn!r}; choose one of: {', '.join(BN_MODES)}")
        if self.bn == "fold" and self.reference:
            raise ConfigError("the reference preset passes BatchNorm through, as the paper does; use bn='pass'")
        self._policies()  # unknown names are refused here, not when a model is explained

    def _policies(self) -> tuple[SplitStrategy, MaxPoolStrategy, AttentionStrategy, ConstantsPolicy]:
        return (split_strategy(self.split, self.reference), maxpool_strategy(self.maxpool, self.reference),
                attention_strategy(self.attention), constants_policy(self.constants))

    def normalization(self) -> tuple[list[float] | None, list[float] | None]:
        """(mean, std) as lists, for rules built by name (zB)."""
        return (None if self.mean is None else list(self.mean), None if self.std is None else list(self.std))

    def strategies(self, rules: RuleSet) -> Strategies:
        """Every choice resolved for a model whose rules are `rules` (they decide `bn=None`)."""
        split, maxpool, attention, constants = self._policies()
        if self.reference:
            default_rule, default_input_rule = ReferenceZPlusRule(), ReferenceZPlusRule(ones_input=True)
            pooling, input_rule = ProportionalRule(epsilon=1e-5), None
        else:
            default_rule, default_input_rule, pooling = ZPlusRule(), WPlusRule(), ProportionalRule()
            input_rule = None if self.input_rule is None else get_rule(self.input_rule, *self.normalization())
        bn = self.bn
        if bn is None:  # fold as soon as any rule divides by a z that BatchNorm changes
            invariant = all(rule.bn_invariant for rule in [*rules.all(), *([input_rule] if input_rule else [])])
            bn = "pass" if invariant or self.reference else "fold"
        return Strategies(split, self.identity_skips, maxpool, pooling, attention, constants, default_rule,
                          default_input_rule, input_rule, bn)

    def rule_map(self) -> dict[Any, RuleSpec]:
        """The rules as the dict the engine sorts by key kind."""
        return dict(self.rules)

    def replace(self, **changes: Any) -> Composite:
        """A copy with some fields changed (e.g. the normalization: ``c.replace(mean=m, std=s)``)."""
        return dataclasses.replace(self, **changes)


COMPOSITE_FIELDS = tuple(f.name for f in dataclasses.fields(Composite))


def resolve_composite(composite: Composite | None, base: Composite | None = None,
                      **options: Any) -> Composite:
    """The one composite of a constructor: `composite`, or the keyword shortcut's options (None
    = not given) over `base` (the constructor's defaults). Giving both is an error."""
    given = {key: value for key, value in options.items() if value is not None}
    if composite is not None:
        if given:
            raise ConfigError(f"give either composite= or its keyword arguments ({', '.join(sorted(given))}), "
                              "not both")
        if not isinstance(composite, Composite):
            raise ConfigError(f"composite must be a relprop.Composite, got {type(composite).__name__}")
        return composite
    return (base or Composite()).replace(**given)


Normalization = Sequence[float] | None
Factory = Callable[[Normalization, Normalization], Composite]
_REGISTRY: dict[str, Factory] = {}
_SUMMARIES: dict[str, str] = {}


def register_composite(name: str, factory: Factory, summary: str = "") -> None:
    """Register `factory(mean, std) -> Composite` under `name` (what `get_composite` builds);
    `summary`, one line of markdown, is what the generated docs say of it."""
    if name in _REGISTRY:
        raise ConfigError(f"composite {name!r} is already registered")
    _REGISTRY[name] = factory
    _SUMMARIES[name] = summary


def composite_names() -> tuple[str, ...]:
    """Every registered composite name."""
    return tuple(_REGISTRY)


def composite_summaries() -> dict[str, str]:
    """Every registered composite name -> its one-line summary (the generated docs' list)."""
    return {name: _SUMMARIES.get(name, "") for name in _REGISTRY}


def get_composite(name: str, *, mean: Normalization = None, std: Normalization = None) -> Composite:
    """A registered composite by name, with the input normalization (needed by zB)."""
    if name not in _REGISTRY:
        raise InputError(f"unknown composite {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name](mean, std)


def _needs_normalization(name: str, mean: Normalization, std: Normalization) -> None:
    if mean is None or std is None:
        raise InputError(f"composite {name!r} uses the zB rule: pass the input normalization "
                         "(get_composite(name, mean=..., std=...))")


def _epsilon_gamma_box(mean: Normalization, std: Normalization) -> Composite:
    _needs_normalization("epsilon-gamma-box", mean, std)
    return Composite(rules={**dict.fromkeys(_CONVS, "gamma"), nn.Linear: "epsilon"}, input_rule="zb",
                     split="signed", maxpool="wta", bn="fold", mean=mean, std=std)


# the paper's method (Relevance Splitting, z+, w⁺ input, BN pass) and its ablations
register_composite("lrp-split", lambda mean, std: Composite(mean=mean, std=std),
                   "the paper's method (Otsuki et al. 2024): ratio split at every residual add, z+, w⁺ at the "
                   "input, BatchNorm passed, CP attention; conserves")
register_composite("lrp-split-sym", lambda mean, std: Composite(split="symmetric", mean=mean, std=std),
                   "`lrp-split` with the symmetric split (the paper's ablation)")
register_composite("lrp-split-noid", lambda mean, std: Composite(identity_skips=False, mean=mean, std=std),
                   "`lrp-split` without splitting at identity skips (the paper's ablation)")
register_composite("lrp-split-sym-noid", lambda mean, std: Composite(
    split="symmetric", identity_skips=False, mean=mean, std=std),
    "both ablations at once")
# the authors' code's numerics (golden equivalence)
register_composite("lrp-split-ref", lambda mean, std: Composite(reference=True, mean=mean, std=std),
                   "`lrp-split` with the authors' code's numerics (reproduces their numbers; leaks a few percent)")
# plain LRP: the signed proportional split of libraries without splitting
register_composite("lrp-plain", lambda mean, std: Composite(split="signed", mean=mean, std=std),
                   "`lrp-split`'s rules with the signed split of libraries without splitting")
# the standard composites (docs/rules.md; aligned with Zennit's)
register_composite("epsilon-plus-flat", lambda mean, std: Composite(
    rules={**dict.fromkeys(_CONVS, "zplus"), nn.Linear: "epsilon"}, input_rule="flat", split="signed",
    maxpool="wta", bn="fold", mean=mean, std=std),
    "Zennit's EpsilonPlusFlat: z+ on convolutions, ε on dense layers, flat at the input, signed split, "
    "winner-takes-all max pooling, BatchNorm folded")
register_composite("epsilon-gamma-box", _epsilon_gamma_box,
                   "Zennit's EpsilonGammaBox: γ on convolutions, ε on dense layers, zB at the input (needs "
                   "mean/std), signed split, winner-takes-all max pooling, BatchNorm folded")
register_composite("alpha2beta1", lambda mean, std: Composite(
    rules=dict.fromkeys(_CONVS, "alpha2beta1"), bn="fold", mean=mean, std=std),
    "α=2, β=1 on convolutions, ratio split, BatchNorm folded; conserves the total with signed parts")


def _lxt(attention: str, mean: Normalization, std: Normalization) -> Composite:
    """LXT's choices (Achtibat et al. 2024, the LXT library): every linear map (dense, convolution,
    the input layer) by ε, LayerNorm with its std held constant, the signed split at adds (what ε on
    an add amounts to), GELU and other activations as the identity, max pooling winner-takes-all and
    BatchNorm folded (both what LXT's Gradient×Input does on CNN parts), and the relevance of
    constants (class token, position embedding) left on them, as Gradient×Input leaves it."""
    return Composite(rules={**dict.fromkeys((*_CONVS, *_CONV_TRANSPOSES), "epsilon"), nn.Linear: "epsilon",
                            nn.LayerNorm: "norm-epsilon"},
                     input_rule="epsilon", split="signed", maxpool="wta", bn="fold", attention=attention,
                     constants="leak", mean=mean, std=std)


# the transformer composites (LXT's choices; docs/rules.md "Transformers")
register_composite("cp-lrp", lambda mean, std: _lxt("cp", mean, std),
                   "LXT's CP-LRP (Ali et al. 2022, LXT's map for torchvision's ViT): attention weights held "
                   "constant, ε on every dense layer and convolution (input layer too), LayerNorm's std held "
                   "constant, signed split, BatchNorm folded, constants leak; leaks by ε and at biases")
register_composite("attnlrp", lambda mean, std: _lxt("attnlrp", mean, std),
                   "AttnLRP (Achtibat et al. 2024): `cp-lrp` with the softmax's Taylor rule and the uniform "
                   "rule on the attention's products; does not conserve (the softmax's shift)")

__all__ = ["Composite", "Strategies", "get_composite", "composite_names", "composite_summaries",
           "register_composite",
           "resolve_composite", "COMPOSITE_FIELDS", "RuleSpec"]
