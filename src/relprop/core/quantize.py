"""Heat Quantization (Otsuki et al.): a map reduced to a few levels, which removes the
noise-level ordering between pixels of almost equal relevance before they are ranked."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from relprop.errors import ConfigError, InputError


def heat_quantize(maps: Tensor | np.ndarray, levels: int = 8) -> Tensor | np.ndarray:
    """Quantize each 2-D map to `levels` values: `bins = linspace(min, max, levels)`, values in
    `[b_i, b_{i+1})` become `b_i`, the maximum stays. Accepts (H, W) or (N, H, W), numpy or
    torch; returns the same type, shape and dtype. Bins are computed in float64 like the
    reference (numpy's linspace of the float32 extremes), so boundary pixels land identically."""
    if levels < 2:
        raise ConfigError(f"levels must be at least 2, got {levels}")
    is_tensor = isinstance(maps, Tensor)
    array = maps.detach().cpu().numpy() if is_tensor else np.asarray(maps)
    if array.ndim not in (2, 3):
        raise InputError(f"heat_quantize takes (H, W) or (N, H, W) maps, got shape {tuple(array.shape)}")
    batch = array[None] if array.ndim == 2 else array
    out = np.stack([_quantize_one(m, levels) for m in batch]).astype(array.dtype, copy=False)
    out = out[0] if array.ndim == 2 else out
    return torch.from_numpy(out).to(maps.device) if is_tensor else out


def _quantize_one(heatmap: np.ndarray, levels: int) -> np.ndarray:
    bins = np.linspace(heatmap.min(), heatmap.max(), levels)
    index = np.clip(np.searchsorted(bins, heatmap, side="right") - 1, 0, levels - 1)
    return bins[index]
