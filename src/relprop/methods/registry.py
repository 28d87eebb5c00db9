"""The methods registry: name -> builder, aliases, and `get_method`.

Adding a method is one class and one `register(...)` line in its family's module (lrp.py,
cams.py, gradients.py, captum.py, bow.py), which `relprop.methods` imports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from relprop.bow.model import is_bow_model
from relprop.errors import ConfigError, InputError
from relprop.heatmaps import Channels
from relprop.methods.base import HQ_SUFFIX, Method, MethodOptions
from relprop.methods.hq import HeatQuantized

Builder = Callable[[nn.Module, str, MethodOptions], Method]


@dataclass(frozen=True)
class Entry:
    """A registered method: its builder, whether it takes keywords for `relprop.LRP`, and whether
    it explains BoW kernel classifiers (relprop.bow) instead of networks."""

    build: Builder
    takes_lrp_options: bool = False
    explains_bow: bool = False


_REGISTRY: dict[str, Entry] = {}
# Older or paper-style names of registered methods: alias -> canonical name.
ALIASES: dict[str, str] = {}


def register(name: str, build: Builder, *, aliases: Sequence[str] = (), takes_lrp_options: bool = False,
             explains_bow: bool = False) -> None:
    """Register `build(model, name, options)` under `name` (and its aliases)."""
    if name in _REGISTRY or name in ALIASES:
        raise ConfigError(f"method {name!r} is already registered")
    _REGISTRY[name] = Entry(build, takes_lrp_options, explains_bow)
    for alias in aliases:
        ALIASES[alias] = name


def canonical_name(name: str) -> str:
    """The registry's name for a method name or alias, `+hq` kept (`ours+hq` -> `lrp-split+hq`);
    results written under an alias stay readable through it."""
    base, hq = (name[: -len(HQ_SUFFIX)], HQ_SUFFIX) if name.endswith(HQ_SUFFIX) else (name, "")
    return ALIASES.get(base, base) + hq


def method_names(*, include_aliases: bool = False) -> tuple[str, ...]:
    """Every registered method name (what --help, the docs and error messages list)."""
    return (*_REGISTRY, *ALIASES) if include_aliases else tuple(_REGISTRY)


def unknown_method(name: str) -> InputError:
    """The one-line refusal of a name the registry does not know, listing the valid ones."""
    aliases = ", ".join(f"{alias} = {canonical}" for alias, canonical in ALIASES.items())
    return InputError(f"unknown method {name!r}; known: {', '.join(_REGISTRY)} (aliases: {aliases}; "
                      f"each also with the suffix {HQ_SUFFIX})")


def requested_methods(names: Iterable[str]) -> list[str]:
    """The requested method names, checked against the registry and kept as spelled (outputs carry
    the name the user asked for; an alias and its registry name are one method, asked for once,
    first spelling kept); an unknown name is one line listing the valid ones."""
    chosen: dict[str, str] = {}
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        canonical = canonical_name(name)
        if canonical.removesuffix(HQ_SUFFIX) not in _REGISTRY:
            raise unknown_method(name)
        chosen.setdefault(canonical, name)
    if not chosen:
        raise InputError("no method given; name at least one, e.g. gradcam")
    return list(chosen.values())


def get_method(name: str, model: nn.Module, *, layer: nn.Module | str | None = None, batch_size: int = 32,
               channels: Channels = "sum", mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, **lrp_options: Any) -> Method:
    """Build a method by its registry name or alias (see `method_names`; any name may end in `+hq`).

    `layer`: CAM layer, a module or its qualified name (default `layer4[-1]` of a ResNet, else
    the last feature map the top logit depends on, see `find_cam_layer`); `batch_size`:
    Score-CAM masked inputs and Integrated Gradients' internal batch per forward; `channels`: 2-D
    reduction before `+hq`; `mean`/`std` and other keywords go to `relprop.LRP`. The method
    keeps the name it was asked by (`get_method("ours").name == "ours"`).
    """
    options = MethodOptions(layer, batch_size, channels, mean, std, dict(lrp_options))
    if name.endswith(HQ_SUFFIX):
        base = get_method(name[: -len(HQ_SUFFIX)], model, layer=layer, batch_size=batch_size,
                          channels=channels, mean=mean, std=std, **lrp_options)
        return HeatQuantized(base, channels)
    entry = _REGISTRY.get(canonical_name(name))
    if entry is None:
        raise unknown_method(name)
    if is_bow_model(model) and not entry.explains_bow:  # BoW models: relprop.methods.bow
        bow = ", ".join(n for n, e in _REGISTRY.items() if e.explains_bow)
        raise InputError(f"method {name!r} needs a network; a BoW model is explained by {bow} "
                         f"(each also with {HQ_SUFFIX})")
    if lrp_options and not entry.takes_lrp_options:
        raise InputError(f"method {name!r} takes no options {sorted(lrp_options)}")
    return entry.build(model, name, options)
