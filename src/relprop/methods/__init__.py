"""Every explanation method behind one Captum-style call, run the way the paper ran it.

    method = get_method("scorecam", model)
    maps = method.attribute(x)            # (N,1,H,W) for CAMs, (N,3,H,W) for pixel methods

Every method explains the **predicted** class unless `target` (class indices) is given. A name with
the suffix `+hq` is that method followed by 8-level Heat Quantization of its 2-D map (N,1,H,W).
relprop's own LRP maps (`lrp-split*`, `lrp-plain`; the paper's names `ours*` are aliases) are 2-D
by channel sum, the paper's heatmap; other 3-channel maps become 2-D by `channels` (`sum`, or
`channel0`: the reference code's quirk).

One module per family: `lrp` (a composite and a name), `cams`, `captum`, `gradients`, `bow`;
`registry` holds the names, `hq` the `+hq` wrapper. Adding a method: one class and one
`register(...)` line in its family's module.
"""

from __future__ import annotations

# the families register their methods on import, in this order (the order of method_names())
# isort: off
from relprop.methods import lrp as _lrp
from relprop.methods import cams as _cams
from relprop.methods import captum as _captum
from relprop.methods import gradients as _gradients
from relprop.methods import bow as _bow
from relprop.methods import contrastive as _contrastive
from relprop.methods import faithful as _faithful
# isort: on
from relprop.methods.base import HQ_SUFFIX, Method, MethodOptions
from relprop.methods.bow import BOW_METHODS, BoWExplainer, BoWOcclusion
from relprop.methods.cams import (
    CAMMethod,
    GradCAM,
    ScoreCAM,
    cam_layer_by_name,
    default_cam_layer,
    find_cam_layer,
    last_block,
    minmax,
    upsample,
)
from relprop.methods.captum import CaptumMethod
from relprop.methods.gradients import Gradient
from relprop.methods.hq import HeatQuantized
from relprop.methods.lrp import LRP_VARIANTS, PAPER_ALIASES, LRPMethod
from relprop.methods.registry import (
    ALIASES,
    canonical_name,
    get_method,
    method_names,
    register,
    requested_methods,
)
from relprop.targets import resolve_target

# Every accepted name: the registry's names, then their aliases (`ours*`).
METHOD_NAMES = method_names(include_aliases=True)

del _lrp, _cams, _captum, _gradients, _bow, _contrastive, _faithful

__all__ = [
    "ALIASES", "BOW_METHODS", "BoWExplainer", "BoWOcclusion", "CAMMethod", "CaptumMethod", "GradCAM", "Gradient", "HQ_SUFFIX", "HeatQuantized",
    "LRPMethod", "LRP_VARIANTS", "METHOD_NAMES", "Method", "MethodOptions", "PAPER_ALIASES", "ScoreCAM",
    "cam_layer_by_name", "canonical_name", "requested_methods", "default_cam_layer", "find_cam_layer", "get_method", "last_block",
    "method_names", "minmax", "register", "resolve_target", "upsample",
]
