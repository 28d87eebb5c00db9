"""The `+hq` wrapper: any method followed by Heat Quantization of its 2-D map."""

from __future__ import annotations

from torch import Tensor

from relprop.core.quantize import heat_quantize
from relprop.heatmaps import Channels
from relprop.methods.base import HQ_SUFFIX, Method


class HeatQuantized(Method):
    """A method followed by 8-level Heat Quantization of its 2-D map (N,1,H,W)."""

    channels = 1

    def __init__(self, base: Method, channels: Channels = "sum", levels: int = 8) -> None:
        super().__init__(base.model, base.name + HQ_SUFFIX)
        self.base, self.reduction, self.levels = base, channels, levels
        self.is_lrp = base.is_lrp

    def attribute(self, inputs, target=None, **kwargs):
        result = self.base.attribute(inputs, target, **kwargs)
        if isinstance(result, tuple):
            return (self.quantize(result[0]), *result[1:])
        return self.quantize(result)

    def quantize(self, base_maps: Tensor) -> Tensor:
        """HQ of maps the base method already made (lets a caller reuse one base map)."""
        return heat_quantize(self.base.to_2d(base_maps, self.reduction), levels=self.levels)[:, None]
