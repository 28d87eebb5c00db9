"""LRP for bag-of-words kernel classifiers (Bach et al., PLOS ONE 2015, section 3).

    pipeline = relprop.bow.fit("tin10/train")            # SIFT grid -> k-means words -> pooling -> SVM
    relprop.bow.save(pipeline, "model.bow.npz")
    explanation = relprop.bow.explain_image(pipeline, image, c)   # (H, W, 3) RGB in [0, 1]
    maps = relprop.methods.get_method("bow-lrp", relprop.bow.BoWModel(pipeline, mean, std)).attribute(x)

See docs/bow.md. Modules: features (dense SIFT), codebook (words, mapping), pooling, kernels,
pipeline (fit, decision), decomposition (the relevance rules, occlusion), model (the torch module),
storage (the pickle-free file format). The methods that wrap them (`bow-lrp`, `bow-occlusion`) live
in `relprop.methods.bow`; this package never imports `relprop.methods`.
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy: `relprop.models` asks `relprop.bow.storage` whether a file is a BoW model, which must not
# import OpenCV and scikit-learn for every network checkpoint.
_EXPORTS = {
    "BoWConfig": "pipeline", "BoWPipeline": "pipeline", "fit": "pipeline",
    "BoWModel": "model", "is_bow_model": "model",
    "Explanation": "decomposition", "explain_image": "decomposition", "occlusion_map": "decomposition",
    "load": "storage", "load_bow_model": "storage", "save": "storage",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'relprop.bow' has no attribute {name!r}")
    return getattr(importlib.import_module(f"relprop.bow.{_EXPORTS[name]}"), name)
