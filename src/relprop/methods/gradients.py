"""Gradient baselines: the input gradient of the target logit, and gradient x input."""

from __future__ import annotations

import torch
from torch import nn

from relprop.methods.base import Method
from relprop.methods.registry import register
from relprop.targets import resolve_target


class Gradient(Method):
    """Gradient of the target logit w.r.t. the input (signed), optionally times the input."""

    def __init__(self, model: nn.Module, name: str = "gradient", times_input: bool = False) -> None:
        super().__init__(model, name)
        self.times_input = times_input

    def attribute(self, inputs, target=None):
        x = inputs.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(x)
            classes = resolve_target(self.model, x, target, logits)
            (grad,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), x)
        return (grad * x.detach() if self.times_input else grad).detach()


register("gradient", lambda model, name, options: Gradient(model, name))
register("gradxinput", lambda model, name, options: Gradient(model, name, times_input=True))
