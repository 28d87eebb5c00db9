"""The BoW pipeline as a torch module.

`BoWModel` maps normalized images (N, 3, H, W), as relprop's preprocessing makes them, to the
one-vs-rest **decision values** f_c(x) (N, C). Everything that takes a softmax of a model's output
(`relprop explain`'s probability, Insertion/Deletion's scores) therefore scores BoW models by the
softmax over decision values, not by Platt-calibrated probabilities. It is not differentiable:
only the BoW methods (`bow-lrp`, `bow-occlusion` in `relprop.methods.bow`, each also `+hq`)
explain it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from relprop.errors import InputError

if TYPE_CHECKING:  # types only: the pipeline imports scikit-learn and OpenCV
    from relprop.bow.pipeline import BoWPipeline


class BoWModel(nn.Module):
    """Normalized images -> decision values, through a fitted `BoWPipeline`."""

    is_bow = True

    def __init__(self, pipeline: BoWPipeline, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        # No weights of its own; the metrics ask the first parameter for the device.
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def images(self, x: Tensor) -> list[np.ndarray]:
        """Normalized (N, 3, H, W) -> (H, W, 3) float RGB arrays in [0, 1]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"expected (N, 3, H, W) images, got shape {tuple(x.shape)}")
        pixels = (x.detach().float() * self.std + self.mean).clamp(0, 1)
        return list(pixels.permute(0, 2, 3, 1).cpu().numpy().astype(np.float64))

    def forward(self, x: Tensor) -> Tensor:
        values = self.pipeline.decision_images(self.images(x))
        return torch.as_tensor(values, dtype=torch.float32, device=x.device)


def is_bow_model(model: Any) -> bool:
    return bool(getattr(model, "is_bow", False))
