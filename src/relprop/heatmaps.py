"""Attribution maps as 2-D heatmaps: the one reduction the methods and the metrics share.

A method's map is (N,C,H,W) or (N,H,W); what is ranked, quantized or drawn is (N,H,W). Both
`relprop.methods` (the `+hq` wrapper, `Method.to_2d`) and `relprop.evaluation` (the metrics)
import it from here, so neither imports the other for it.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from relprop.errors import InputError

Channels = Literal["sum", "channel0"]


def to_2d(maps: Tensor, channels: Channels = "sum") -> Tensor:
    """(N,C,H,W) or (N,H,W) maps -> (N,H,W) float32 maps to rank.

    `sum`: signed channel sum (the LRP heatmap). `channel0`: channel 0 only, the reference code's
    quirk for 3-channel baselines (it resizes `attention[0]`), to reproduce its numbers.
    """
    maps = maps.detach()
    if maps.ndim == 3:
        return maps.float()
    if maps.ndim != 4:
        raise InputError(f"maps must be (N,C,H,W) or (N,H,W), got shape {tuple(maps.shape)}")
    if channels == "sum":
        return maps.sum(dim=1).float()
    if channels == "channel0":
        return maps[:, 0].float()
    raise InputError(f"channels must be 'sum' or 'channel0', got {channels!r}")
