"""Methods of bag-of-words kernel classifiers (relprop.bow; models from `relprop fit-bow`).

`bow-lrp` (`BoWExplainer`, LRP through the SVM, the pooling and the local features) and
`bow-occlusion` (`BoWOcclusion`, the model-agnostic check) wrap relprop.bow's functions as
`Method`s. Network methods refuse BoW models in the registry; these refuse networks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from relprop.bow.model import BoWModel, is_bow_model
from relprop.defaults import IMAGENET_MEAN, IMAGENET_STD
from relprop.errors import InputError
from relprop.methods.base import Method
from relprop.methods.registry import register
from relprop.targets import resolve_target

if TYPE_CHECKING:
    from relprop.bow.pipeline import BoWPipeline

BOW_METHODS = ("bow-lrp", "bow-occlusion")


class BoWExplainer(Method):
    """LRP for the BoW-SVM: (N, 1, H, W) pixel relevance of the target class.

    `model`: a `BoWModel`, or a `BoWPipeline` (then wrapped with `mean`/`std`, ImageNet's by
    default). `target`: None (each image's predicted class), an int, or N ints. `bias`: how b_c is
    shared (none, uniform, proportional; see docs/bow.md). With `return_layer_sums=True` also
    {"output", "bow", "local", "input", "f", "bias", "residual"}: (N,) tensors.
    """

    is_lrp = True
    channels = 1

    def __init__(self, model: BoWModel | BoWPipeline, name: str = "bow-lrp", bias: str = "none",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        # deferred: scikit-learn and OpenCV load when a BoW model is explained, not with relprop.methods
        from relprop.bow.pipeline import BoWPipeline

        if isinstance(model, BoWPipeline):
            model = BoWModel(model, mean or IMAGENET_MEAN, std or IMAGENET_STD)
        if not is_bow_model(model):
            raise InputError(f"{name} explains BoW models (relprop fit-bow); got {type(model).__name__}")
        super().__init__(model, name)
        self.bias = bias

    def attribute(self, inputs: Tensor, target: Tensor | int | Sequence[int] | None = None,
                  return_layer_sums: bool = False):
        from relprop.bow.decomposition import explain_image  # deferred: scikit-learn, OpenCV

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
        from relprop.bow.decomposition import occlusion_map  # deferred: scikit-learn, OpenCV

        classes = resolve_target(self.model, inputs, target)
        maps = [occlusion_map(self.model.pipeline, image, int(c)) for image, c in
                zip(self.model.images(inputs), classes.tolist(), strict=True)]
        return torch.as_tensor(np.stack(maps)[:, None], dtype=torch.float32, device=inputs.device)


def _build(model: Any, name: str, options: Any) -> Method:
    if not is_bow_model(model):
        raise InputError(f"method {name!r} explains BoW models (relprop fit-bow); this model is "
                         f"{type(model).__name__}")
    return BoWExplainer(model, name) if name == "bow-lrp" else BoWOcclusion(model, name)


for _name in BOW_METHODS:
    register(_name, _build, explains_bow=True)
