"""Quantus' model-parameter randomization test (Adebayo et al. 2018) runs on relprop's methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

quantus = pytest.importorskip("quantus")


def explain_with(name: str):
    """Quantus' explain_func: relprop's method on the (randomized) model it is handed, 2-D maps."""
    from relprop.methods import get_method

    def explain(model, inputs, targets, **_):
        method = get_method(name, model)
        maps = method.to_2d(method.attribute(torch.as_tensor(inputs), target=torch.as_tensor(targets).tolist()))
        return maps[:, None].numpy()

    return explain


def test_mprt_gradient_maps_change_as_layers_are_randomized():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    x = torch.rand(3, 3, 16, 16)
    y = model(x).argmax(1).numpy()
    metric = quantus.MPRT(layer_order="top_down", seed=42, disable_warnings=True)
    scores = metric(model=model, x_batch=x.numpy(), y_batch=y, a_batch=None, channel_first=True,
                    explain_func=explain_with("gradient"), device="cpu")
    layers = list(scores)  # "original", then the layers re-initialized top-down (cascading)
    assert layers[0] == "original" and layers[1:] == ["6", "2", "0"]
    assert np.allclose(scores["original"], 1.0, atol=1e-6)  # the unperturbed maps are reproduced
    means = [float(np.mean(scores[layer])) for layer in layers[1:]]
    assert all(m < 0.99 for m in means)  # every re-initialization changes the maps
    assert means[-1] < means[0]  # and a fully random model's maps share less than after the top alone
