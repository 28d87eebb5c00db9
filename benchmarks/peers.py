"""The peer LRP libraries as bench_lrp.py's methods: LXT, Zennit, Captum, on copies of the model.

Each peer runs on its own deep copy of the network: LXT's efficient mode patches `forward` (here
per instance, on the copy, with LXT's own patch functions; LXT itself patches the torch classes,
which would also change relprop's and the gradient's runs in the same process), Zennit's
canonizers and hooks and Captum's rule attributes live on the copy. Nothing here is part of the
library.

- `lxt`: LXT 2.1's CP-LRP map for torchvision's ViT (`lxt/efficient/models/vit_torch.py`: the
  GELU identity, LayerNorm's std held constant, q and k detached in `nn.MultiheadAttention`), then
  gradient × input: one forward and one backward. relprop with the same rules: `cp-lrp`.
- `zennit`: Zennit 0.5's EpsilonPlusFlat with bias-free z+ (relprop's convention) and its ResNet
  or VGG canonizer. relprop with the same rules: `epsilon-plus-flat`.
- `captum`: Captum's `LRP` with its default rules (ε = 1e-9 on every layer, identity on ReLU).
  Captum does not split at residual adds: on a ResNet its totals are not LRP's. relprop with the
  same rules, where there are no adds (VGG): `cp-lrp`.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

PEERS = ("lxt", "zennit", "captum")
SAME_RULES = {"lxt": "cp-lrp", "zennit": "epsilon-plus-flat", "captum": "cp-lrp"}


class PeerUnavailable(Exception):
    """The peer does not run on this network (or is not installed): the row says why."""


@dataclass(frozen=True)
class Peer:
    """`run(x)`: what is timed (the explained class found by the peer's own forward where it
    can, else given); `relevance(x, seed)`: the input map for an output relevance `seed`
    (N, classes), to compare with relprop's."""

    run: Callable[[torch.Tensor], object]
    relevance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def peer(name: str, model: nn.Module) -> Peer:
    """The peer `name` on a copy of `model`; any failure of the peer's own code becomes
    `PeerUnavailable` with its first line (a row's note, not a crash)."""
    build = {"lxt": _lxt, "zennit": _zennit, "captum": _captum}[name]
    made = build(model)
    return Peer(_guarded(name, made.run), _guarded(name, made.relevance))


def _guarded(name: str, function: Callable) -> Callable:
    def call(*args: torch.Tensor) -> object:
        try:
            return function(*args)
        except PeerUnavailable:
            raise
        except Exception as error:
            first = (str(error).splitlines() or [""])[0][:160]
            raise PeerUnavailable(f"{name}: {type(error).__name__}: {first}") from None

    return call


def _lxt_patches() -> types.ModuleType:
    """LXT's patch functions without `lxt.efficient`'s package import, which imports its BERT
    patches (they need transformers < 5): the same workaround as tests/test_transformers.py."""
    if importlib.util.find_spec("lxt") is None:
        raise PeerUnavailable("lxt is not installed (dev extra)")
    if "lxt.efficient.models" not in sys.modules:
        stub = types.ModuleType("lxt.efficient.models")
        stub.get_default_map = None
        sys.modules["lxt.efficient.models"] = stub
    import lxt.efficient.patches as patches

    return patches


def _lxt(model: nn.Module) -> Peer:
    from torchvision.models import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise PeerUnavailable("LXT 2.1 ships a CP-LRP patch map for torchvision's ViT only")
    patches = _lxt_patches()
    patched = copy.deepcopy(model)
    for module in patched.modules():  # vit_torch.cp_LRP, applied per instance
        if isinstance(module, nn.GELU):
            module.original_forward = module.forward
            module.forward = types.MethodType(patches.non_linear_forward, module)
        elif isinstance(module, nn.LayerNorm):
            module.forward = types.MethodType(patches.layer_norm_forward, module)
        elif isinstance(module, nn.MultiheadAttention):
            module.original_forward = module.forward
            module.forward = types.MethodType(patches.cp_multi_head_attention_forward, module)

    def run(x: torch.Tensor) -> torch.Tensor:  # the input's gradient only, as the baseline takes it
        x = x.detach().requires_grad_(True)
        logits = patched(x)
        return x * torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), x)[0]

    def relevance(x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        logits = patched(x)
        explained = (logits * (seed / logits).detach()).sum()  # output relevance = seed
        return (x * torch.autograd.grad(explained, x)[0]).detach()

    return Peer(run, relevance)


def _zennit(model: nn.Module) -> Peer:
    if importlib.util.find_spec("zennit") is None:
        raise PeerUnavailable("zennit is not installed (dev extra)")
    from torchvision.models import VGG, ResNet
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.rules import ZPlus
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    from zennit.types import Convolution

    canonizer = {ResNet: ResNetCanonizer, VGG: VGGCanonizer}.get(type(model))
    if canonizer is None:
        raise PeerUnavailable("Zennit has canonizers for torchvision's ResNet and VGG only "
                              "(without one its totals are not LRP's)")
    composite = EpsilonPlusFlat(layer_map=[(Convolution, ZPlus(zero_params="bias"))], canonizers=[canonizer()])
    attributor = Gradient(copy.deepcopy(model), composite)
    attributor.__enter__()  # registered once, as relprop's LRP is built once; left for the process

    def run(x: torch.Tensor) -> torch.Tensor:
        return attributor(x.detach().requires_grad_(True),
                          lambda out: torch.zeros_like(out).scatter(1, out.argmax(1, keepdim=True), 1.0))[1]

    def relevance(x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        return attributor(x.detach().requires_grad_(True), seed)[1].detach()

    return Peer(run, relevance)


def _captum(model: nn.Module) -> Peer:
    if importlib.util.find_spec("captum") is None:
        raise PeerUnavailable("captum is not installed (dev extra)")
    from captum.attr import LRP as CaptumLRP

    copied = copy.deepcopy(model)
    lrp = CaptumLRP(copied)
    targets: dict[int, torch.Tensor] = {}  # Captum needs the class before its pass: found once per input

    def run(x: torch.Tensor) -> torch.Tensor:
        if id(x) not in targets:
            with torch.no_grad():
                targets[id(x)] = copied(x).argmax(1)
        return lrp.attribute(x.detach().requires_grad_(True), target=targets[id(x)])

    def relevance(x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        target = seed.abs().argmax(1)  # Captum seeds the explained logit itself
        with torch.no_grad():
            logits = copied(x)
        scale = seed.gather(1, target[:, None]) / logits.gather(1, target[:, None])
        R = lrp.attribute(x.detach().requires_grad_(True), target=target).detach()
        return R * scale.view(-1, *([1] * (R.dim() - 1)))

    return Peer(run, relevance)
