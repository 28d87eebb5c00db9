"""relprop: Layer-wise Relevance Propagation with the conservation property for residual
networks (Relevance Splitting, Otsuki et al. ECCV 2024) and single-shot detectors."""

from relprop.engine import RelevanceEngine
from relprop.lrp import LRP
from relprop.quantize import heat_quantize
from relprop.rules import Rule, get_rule

__version__ = "0.1.0"
__all__ = ["LRP", "RelevanceEngine", "Rule", "get_rule", "heat_quantize", "__version__"]
