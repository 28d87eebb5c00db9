"""Local features on a dense grid of square patches: OpenCV SIFT, optionally plus colour statistics.

Each local feature knows its pixel support: the patch `(top, left, size)`. To make that support
exact (a descriptor is a function of its patch's pixels only), every patch is cut out, padded by
reflecting its own pixels, and laid out in a mosaic with one cell per patch; OpenCV's SIFT is then
computed at the cell centres with a key-point size that keeps the descriptor window (and the
pyramid's blur) inside the cell. Without this, SIFT at dense key points on the whole image would
also read pixels around the patch, and the patch would not be the feature's support.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from relprop.errors import InputError

SIFT_DIM = 128
COLOUR_DIM = 6  # mean and std of R, G, B in the patch
# OpenCV's SIFT window is 4 bins of 3 * size / 2 pixels each: size = patch / 8 keeps the window
# (with its interpolation margin) to the patch, and the reflect padding keeps the blur inside it.
_SIZE_PER_PATCH = 1 / 8


@dataclass(frozen=True)
class Grid:
    """Patch size and stride (pixels), chosen by the user."""

    patch: int = 16
    stride: int = 8

    def __post_init__(self) -> None:
        if self.patch < 8 or self.stride < 1:
            raise InputError(f"patch {self.patch} must be >= 8 pixels and stride {self.stride} >= 1")

    def positions(self, height: int, width: int) -> np.ndarray:
        """(M, 2) top-left corners of the patches that fit inside an H x W image."""
        if height < self.patch or width < self.patch:
            raise InputError(f"image {height}x{width} is smaller than the patch size {self.patch}")
        tops = np.arange(0, height - self.patch + 1, self.stride)
        lefts = np.arange(0, width - self.patch + 1, self.stride)
        return np.stack(np.meshgrid(tops, lefts, indexing="ij"), axis=-1).reshape(-1, 2)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float RGB in [0, 1] -> uint8 (values outside are clipped)."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def local_features(image: np.ndarray, grid: Grid, colour: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors (M, D) and patch corners (M, 2) of one (H, W, 3) float RGB image in [0, 1]."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    rgb = to_uint8(image)
    corners = grid.positions(*rgb.shape[:2])
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    descriptors = _sift_patches(gray, corners, grid.patch)
    if colour:
        descriptors = np.hstack([descriptors, _colour_stats(rgb, corners, grid.patch)])
    return descriptors.astype(np.float32), corners


def _sift_patches(gray: np.ndarray, corners: np.ndarray, patch: int) -> np.ndarray:
    pad = patch // 2
    cell = patch + 2 * pad
    columns = int(np.ceil(np.sqrt(len(corners))))
    rows = int(np.ceil(len(corners) / columns))
    mosaic = np.zeros((rows * cell, columns * cell), dtype=np.uint8)
    keypoints = []
    for k, (top, left) in enumerate(corners):
        crop = gray[top:top + patch, left:left + patch]
        r, c = divmod(k, columns)
        mosaic[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = cv2.copyMakeBorder(
            crop, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
        centre = (c * cell + cell / 2 - 0.5, r * cell + cell / 2 - 0.5)
        keypoints.append(cv2.KeyPoint(centre[0], centre[1], patch * _SIZE_PER_PATCH, 0))
    sift = cv2.SIFT_create()
    kept, descriptors = sift.compute(mosaic, keypoints)
    if descriptors is None or len(kept) != len(keypoints):
        raise InputError("OpenCV SIFT dropped dense key points; use a larger patch")
    return descriptors


def _colour_stats(rgb: np.ndarray, corners: np.ndarray, patch: int) -> np.ndarray:
    """Mean and std per channel, scaled to SIFT's range (0..255) so neither part dominates."""
    stats = []
    for top, left in corners:
        pixels = rgb[top:top + patch, left:left + patch].reshape(-1, 3).astype(np.float64)
        stats.append(np.concatenate([pixels.mean(axis=0), pixels.std(axis=0)]))
    return np.asarray(stats, dtype=np.float32)
