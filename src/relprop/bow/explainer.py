"""The BoW pipeline as a torch module, and its explanation methods in relprop's registry.

`BoWModel` maps normalized images (N, 3, H, W), as relprop's preprocessing makes them, to the
one-vs-rest **decision values** f_c(x) (N, C). Everything that takes a softmax of a model's output
(`relprop explain`'s probability, Insertion/Deletion's scores) therefore scores BoW models by the
softmax over decision values, not by Platt-calibrated probabilities. It is not differentiable:
only the BoW methods (`bow-lrp`, `bow-occlusion`, each also `+hq`) explain it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from relprop.bow.decomposition import explain_image
from relprop.bow.pipeline import BoWPipeline
from relprop.errors import InputError
from relprop.methods import BOW_METHODS, Method, resolve_target


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


class BoWExplainer(Method):
    """LRP for the BoW-SVM: (N, 1, H, W) pixel relevance of the target class.

    `target`: None (each image's predicted class), an int, or N ints. `bias`: how b_c is shared
    (none, uniform, proportional; see docs/bow.md). With `return_layer_sums=True` also
    {"output", "bow", "local", "input", "f", "bias", "residual"}: (N,) tensors.
    """

    is_lrp = True
    channels = 1

    def __init__(self, model: BoWModel | BoWPipeline, name: str = "bow-lrp", bias: str = "none",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        if isinstance(model, BoWPipeline):
            from relprop.models import IMAGENET_MEAN, IMAGENET_STD

            model = BoWModel(model, mean or IMAGENET_MEAN, std or IMAGENET_STD)
        if not is_bow_model(model):
            raise InputError(f"{name} explains BoW models (relprop fit-bow); got {type(model).__name__}")
        super().__init__(model, name)
        self.bias = bias

    def attribute(self, inputs: Tensor, target: Tensor | int | Sequence[int] | None = None,
                  return_layer_sums: bool = False):
        classes = resolve_target(self.model, inputs, target)
        explanations = [explain_image(self.model.pipeline, image, int(c), self.bias)
                        for image, c in zip(self.model.images(inputs), classes.tolist(), strict=True)]
        maps = torch.as_tensor(np.stack([e.pixels for e in explanations])[:, None],
                               dtype=torch.float32, device=inputs.device)
        if not return_layer_sums:
            return maps
        keys = explanations[0].layer_sums() if explanations else {}
        sums = {k: torch.tensor([e.layer_sums()[k] for e in explanations], dtype=torch.float64)
                for k in keys}
        return maps, sums


class BoWOcclusion(Method):
    """Model-agnostic check: f_c(x) - f_c(x with one patch set to the image's mean colour), per
    patch of the model's grid; a pixel gets the mean over the patches that cover it."""

    channels = 1

    def __init__(self, model: BoWModel, name: str = "bow-occlusion") -> None:
        if not is_bow_model(model):
            raise InputError(f"{name} explains BoW models (relprop fit-bow); got {type(model).__name__}")
        super().__init__(model, name)

    def attribute(self, inputs: Tensor, target: Tensor | int | Sequence[int] | None = None) -> Tensor:
        classes = resolve_target(self.model, inputs, target)
        maps = [self._one(image, int(c)) for image, c in
                zip(self.model.images(inputs), classes.tolist(), strict=True)]
        return torch.as_tensor(np.stack(maps)[:, None], dtype=torch.float32, device=inputs.device)

    def _one(self, image: np.ndarray, c: int) -> np.ndarray:
        pipeline = self.model.pipeline
        patch = pipeline.config.patch
        corners = pipeline.grid.positions(*image.shape[:2])
        colour = image.reshape(-1, 3).mean(axis=0)
        occluded = []
        for top, left in corners:
            copy = image.copy()
            copy[top:top + patch, left:left + patch] = colour
            occluded.append(copy)
        drops = pipeline.decision_images([image])[0, c] - pipeline.decision_images(occluded)[:, c]
        total, cover = np.zeros(image.shape[:2]), np.zeros(image.shape[:2])
        for (top, left), drop in zip(corners, drops, strict=True):
            total[top:top + patch, left:left + patch] += drop
            cover[top:top + patch, left:left + patch] += 1
        return np.divide(total, cover, out=np.zeros_like(total), where=cover > 0)


def get_bow_method(name: str, model: Any) -> Method:
    """The registry's entry for BoW methods; network methods on a BoW model are refused."""
    if not is_bow_model(model):
        raise InputError(f"method {name!r} explains BoW models (relprop fit-bow); this model is "
                         f"{type(model).__name__}")
    if name == "bow-lrp":
        return BoWExplainer(model, name)
    if name == "bow-occlusion":
        return BoWOcclusion(model, name)
    raise InputError(f"method {name!r} needs a network; a BoW model is explained by "
                     f"{', '.join(BOW_METHODS)} (each also with +hq)")
