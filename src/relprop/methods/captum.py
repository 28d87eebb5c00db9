"""Captum's attributions as the paper's baselines ran them: their classes with their defaults."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

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
        import captum.attr

        return getattr(captum.attr, class_name)(model)

    return factory


register("ig", lambda model, name, options: CaptumMethod(
    model, name, _captum("IntegratedGradients"), internal_batch_size=max(options.batch_size, 50)))
register("gbp", lambda model, name, options: CaptumMethod(model, name, _captum("GuidedBackprop")))
register("lrp-captum", lambda model, name, options: CaptumMethod(model, name, _captum("LRP")))
