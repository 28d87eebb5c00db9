"""relprop: Layer-wise Relevance Propagation with the conservation property for residual
networks (Relevance Splitting, Otsuki et al. ECCV 2024) and single-shot detectors.

The public names are imported on first use, so `relprop --help` does not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

_EXPORTS = {
    "LRP": "relprop.core.lrp",
    "Composite": "relprop.core.composites",
    "get_composite": "relprop.core.composites",
    "composite_names": "relprop.core.composites",
    "get_method": "relprop.methods",
    "method_names": "relprop.methods",
    "CRP": "relprop.detection.crp",
    "RelevanceEngine": "relprop.core.interpreter",
    "Rule": "relprop.core.rules",
    "get_rule": "relprop.core.rules",
    "heat_quantize": "relprop.core.quantize",
    "load_model": "relprop.models",
    "save_checkpoint": "relprop.checkpoints",
}
__all__ = ["LRP", "Composite", "get_composite", "composite_names", "RelevanceEngine", "Rule", "get_rule",
           "get_method", "method_names", "CRP", "heat_quantize", "load_model", "save_checkpoint",
           "__version__"]

if TYPE_CHECKING:
    from relprop.checkpoints import save_checkpoint
    from relprop.core.composites import Composite, composite_names, get_composite
    from relprop.core.interpreter import RelevanceEngine
    from relprop.core.lrp import LRP
    from relprop.core.quantize import heat_quantize
    from relprop.core.rules import Rule, get_rule
    from relprop.detection.crp import CRP
    from relprop.methods import get_method, method_names
    from relprop.models import load_model


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'relprop' has no attribute {name!r}")
