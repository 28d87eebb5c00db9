"""Independent references the tests compare relprop with: gradient × input of the explained logit
and the LRP-0 configuration that must equal it on piecewise-linear networks (Ancona et al., 2018):
the z-rule (ε = 0) on every conv and linear layer and at the input, the signed split unstabilized,
seeded with the explained logit."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from relprop import LRP
from relprop.core.rules import EpsilonRule
from relprop.core.splitting import SignedSplit

Z_RULE = EpsilonRule(0.0)
LRP0_RULES = {nn.Conv1d: Z_RULE, nn.Conv2d: Z_RULE, nn.Conv3d: Z_RULE, nn.Linear: Z_RULE}


def explained_logit_seed(logits: torch.Tensor) -> torch.Tensor:
    """The top logit of each row where it is, zeros elsewhere: LRP-0's seed."""
    explained = logits.argmax(1, keepdim=True)
    return torch.zeros_like(logits).scatter(1, explained, logits.gather(1, explained)).detach()


def gradient_times_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """∂(explained logit)/∂x · x."""
    inputs = x.clone().requires_grad_(True)
    logits = model(inputs)
    explained = logits.argmax(1, keepdim=True)
    (gradient,) = torch.autograd.grad(logits.gather(1, explained).sum(), inputs)
    return gradient * x


def lrp0_explainer(model: nn.Module, rules: dict[Any, Any] | None = None, **options: Any) -> LRP:
    """LRP-0 (more `rules` and LRP options, e.g. maxpool="wta" or bn=, on top)."""
    return LRP(model, rules={**LRP0_RULES, **(rules or {})}, input_rule=Z_RULE, split=SignedSplit(epsilon=0.0),
               **options)


def lrp0(model: nn.Module, x: torch.Tensor, rules: dict[Any, Any] | None = None, **options: Any) -> torch.Tensor:
    """LRP-0's input relevance, seeded with the explained logit."""
    with torch.no_grad():
        seed = explained_logit_seed(model(x))
    return lrp0_explainer(model, rules, **options).attribute(x, target=seed)


def redraw_layer_scales(model: nn.Module) -> nn.Module:
    """Random weights as a trained model has them where initialization zeroes a branch: layer
    scales and zero-initialized norm weights (Swin v2's res-post-norm) redrawn in [0.1, 1]."""
    with torch.no_grad():
        for module in model.modules():
            for name in ("gamma", "gamma_1", "gamma_2", "layer_scale", "weight"):
                p = getattr(module, name, None)
                if not isinstance(p, nn.Parameter) or p.dim() != 1:
                    continue
                if name != "weight" or (isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and not p.any()):
                    p.uniform_(0.1, 1.0)
    return model.eval()
