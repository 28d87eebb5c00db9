"""`Method`, the base class of every registered explanation method, and its build options."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from relprop.heatmaps import Channels, to_2d

HQ_SUFFIX = "+hq"


@dataclass(frozen=True)
class MethodOptions:
    """What `get_method` passes to a method's builder: CAM layer, batch size, 2-D reduction
    before +hq, input normalization, and keywords for `relprop.LRP` (LRP methods only)."""

    layer: nn.Module | str | None = None
    batch_size: int = 32
    channels: Channels = "sum"
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    lrp: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class: `name`, `is_lrp` (relprop LRP, with conservation sums), `channels` (3 or 1)."""

    is_lrp = False
    channels = 3

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model = model
        self.name = name

    def attribute(self, inputs: Tensor, target: Tensor | int | Sequence[int] | None = None) -> Tensor:
        raise NotImplementedError

    def __call__(self, inputs: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """`method(x)` is `method.attribute(x)`: a method object looks like a function, so it is one."""
        return self.attribute(inputs, *args, **kwargs)

    def to_2d(self, maps: Tensor, channels: Channels = "sum") -> Tensor:
        """(N,H,W) map as ranked by the metrics: LRP heatmaps are channel sums by definition."""
        return to_2d(maps, "sum" if self.is_lrp else channels)
