"""Captum's attributions as the paper's baselines ran them: their classes with their defaults."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from relprop.errors import InputError
from relprop.methods.base import Method
from relprop.methods.registry import register
from relprop.targets import resolve_target


class CaptumMethod(Method):
    """A Captum attribution class called with its defaults, as the paper's baselines were."""

    def __init__(self, model: nn.Module, name: str, factory: Callable[[nn.Module], Any],
                 **kwargs: Any) -> None:
        super().__init__(model, name)
        self.factory, self.kwargs = factory, kwargs

    def attribute(self, inputs, target=None):
        classes = resolve_target(self.model, inputs, target)
        x = inputs.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            maps = self.factory(self.model).attribute(x, target=classes, **self.kwargs)
        return maps.detach()


def _captum(class_name: str) -> Callable[[nn.Module], Any]:
    """Captum's class, imported on first use (captum is slow to import)."""

    def factory(model: nn.Module) -> Any:
        import captum.attr  # deferred: captum is slow to import; only its methods need it

        return getattr(captum.attr, class_name)(model)

    return factory


register("ig", lambda model, name, options: CaptumMethod(
    model, name, _captum("IntegratedGradients"), internal_batch_size=max(options.batch_size, 50)))
def guided_backprop(model: nn.Module, name: str) -> CaptumMethod:
    """Captum's GuidedBackprop, which changes only the backward pass of `nn.ReLU` modules: on a
    model with none (ViT, Swin, ConvNeXt: GELU; EfficientNet: SiLU) it would silently be the plain
    gradient, so it is refused there. Other activations beside ReLUs (MobileNetV3's Hardswish)
    pass their ordinary gradient."""
    if not any(isinstance(module, nn.ReLU) for module in model.modules()):
        kinds = sorted({type(m).__name__ for m in model.modules()
                        if "activation" in type(m).__module__})
        raise InputError(f"{name}: guided backprop changes the backward pass of nn.ReLU modules "
                         f"only, and {type(model).__name__} has none (activations: "
                         f"{', '.join(kinds) or 'none as modules'}); it would be the plain "
                         "gradient: use the method 'gradient'")
    return CaptumMethod(model, name, _captum("GuidedBackprop"))


register("gbp", lambda model, name, options: guided_backprop(model, name))
register("lrp-captum", lambda model, name, options: CaptumMethod(model, name, _captum("LRP")))
