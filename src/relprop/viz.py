"""Pictures of relevance maps: overlays with a colour bar, side-by-side panels, report thumbnails.

Signed maps (LRP, gradients) are drawn centred at zero: positive relevance red, negative blue,
zero transparent so the photo shows through; the colour scale is symmetric and set by the
99.5th percentile of |map|, so one hot pixel cannot wash out the rest (the colour bar's arrows
say values beyond it are clipped). Non-negative maps (CAMs) and `sign="positive"` use a warm
yellow-to-red ramp from zero. Figures are drawn with matplotlib's Agg canvas, without pyplot,
so nothing here touches global state or needs a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from relprop.errors import InputError

Sign = Literal["all", "positive"]
SIGNS: tuple[Sign, ...] = ("all", "positive")

PERCENTILE = 99.5
SIGNED_CMAP = LinearSegmentedColormap.from_list(
    "relprop_signed", ["#08306b", "#2171b5", "#9ecae1", "#f7f7f7", "#fc9272", "#cb181d", "#67000d"]
)
POSITIVE_CMAP = colormaps["YlOrRd"]
_MAX_ALPHA = 0.85  # the strongest relevance still lets the photo's edges through


@dataclass(frozen=True)
class HeatScale:
    """How values map to colour: limits, and whether the map is shown signed."""

    vmin: float
    vmax: float
    signed: bool

    @property
    def cmap(self) -> Colormap:
        return SIGNED_CMAP if self.signed else POSITIVE_CMAP

    @property
    def norm(self) -> Normalize:
        return Normalize(self.vmin, self.vmax, clip=True)


def heat_2d(relevance: np.ndarray) -> np.ndarray:
    """(H,W), (1,H,W) or (C,H,W) -> (H,W) float32: channels are summed (the LRP heatmap)."""
    arr = np.asarray(relevance, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr.sum(axis=0)
    if arr.ndim != 2:
        raise InputError(f"expected a map of shape (H,W) or (C,H,W), got {arr.shape}")
    return np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)


def apply_sign(heat: np.ndarray, sign: Sign) -> np.ndarray:
    """`positive` keeps only positive relevance (negatives become zero)."""
    return np.maximum(heat, 0.0) if sign == "positive" else heat


def heat_scale(heat: np.ndarray, sign: Sign = "all") -> HeatScale:
    """Colour limits for one map: symmetric around zero if it is signed, from zero otherwise."""
    heat = apply_sign(heat, sign)
    signed = bool((heat < 0).any())
    magnitude = np.abs(heat)
    top = float(np.percentile(magnitude, PERCENTILE)) if magnitude.size else 0.0
    if top <= 0.0:
        top = float(magnitude.max()) if magnitude.size else 0.0
    top = top if top > 0.0 else 1.0  # an all-zero map: any positive limit draws it empty
    return HeatScale(-top if signed else 0.0, top, signed)


def resize_map(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to (H, W), for CAMs computed at a coarser grid than the image."""
    if heat.shape == tuple(size):
        return heat
    img = Image.fromarray(heat.astype(np.float32), mode="F")
    return np.asarray(img.resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def blend(image: np.ndarray, heat: np.ndarray, scale: HeatScale) -> np.ndarray:
    """Colour the map over a faded grey copy of the image; opacity grows with |relevance|."""
    heat = resize_map(heat, image.shape[:2])
    rgba = scale.cmap(scale.norm(heat))
    strength = np.clip(np.abs(heat) / scale.vmax, 0.0, 1.0)[..., None]
    alpha = _MAX_ALPHA * strength  # opacity in proportion: faint relevance stays faint
    grey = image.astype(np.float32).mean(axis=2, keepdims=True) / 255.0
    base = 0.35 + 0.55 * grey  # faded, so colour reads on dark and light photos alike
    out = (1.0 - alpha) * base + alpha * rgba[..., :3]
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def empty_note(relevance: np.ndarray, sign: Sign = "all") -> str | None:
    """What to write on a map that would draw nothing, so that it is not read as a photo with
    faint relevance: e.g. Grad-CAM of a class with no positive evidence at its layer is all zero."""
    heat = heat_2d(relevance)
    if not heat.any():
        return "map is zero everywhere"
    if sign == "positive" and not (heat > 0).any():
        return "no positive relevance"
    return None


def _note_empty(ax, relevance: np.ndarray, sign: Sign, fontsize: float) -> None:
    note = empty_note(relevance, sign)
    if note is not None:
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize=fontsize,
                color="#222222", wrap=True,
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "#888888"})


def render_map(image: np.ndarray, relevance: np.ndarray, sign: Sign = "all") -> np.ndarray:
    """The overlay as an RGB uint8 array (no figure): for thumbnails and galleries."""
    heat = apply_sign(heat_2d(relevance), sign)
    return blend(image, heat, heat_scale(heat, sign))


def denormalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalized (3,H,W) model input back to the RGB uint8 (H,W,3) picture the model saw."""
    arr = np.asarray(x, dtype=np.float32)
    arr = arr * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    return np.clip(np.rint(arr.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write a figure as PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.05, facecolor="white")
    return path


def _colorbar(fig: Figure, ax, scale: HeatScale) -> None:
    mappable = ScalarMappable(norm=Normalize(scale.vmin, scale.vmax), cmap=scale.cmap)
    bar = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.03,
                       extend="both" if scale.signed else "max")
    bar.ax.tick_params(labelsize=7)
    bar.formatter.set_powerlimits((-2, 3))
    bar.update_ticks()
    bar.ax.yaxis.get_offset_text().set_fontsize(7)
    label = "relevance (red +, blue −)" if scale.signed else "relevance"
    bar.set_label(label, fontsize=8)


def save_overlay(path: str | Path, image: np.ndarray, relevance: np.ndarray, *,
                 title: str = "", sign: Sign = "all") -> Path:
    """One method's map over the image, with a colour bar, as PNG."""
    heat = apply_sign(heat_2d(relevance), sign)
    scale = heat_scale(heat, sign)
    fig = _figure(3.6, 3.0)
    ax = fig.add_subplot()
    ax.imshow(blend(image, heat, scale), interpolation="nearest")
    ax.set_axis_off()
    _note_empty(ax, relevance, sign, fontsize=9)
    if title:
        ax.set_title(title, fontsize=9)
    _colorbar(fig, ax, scale)
    return save_figure(fig, path, dpi=120)


@dataclass
class PanelRow:
    """One image of a panel: the picture the model saw, a caption, and maps by method name."""

    image: np.ndarray
    caption: str
    maps: Mapping[str, np.ndarray] = field(default_factory=dict)


def save_panel(path: str | Path, rows: Sequence[PanelRow], *, sign: Sign = "all",
               cell: float = 1.9) -> Path:
    """Original + every method side by side, one row per image (the paper's qualitative figure)."""
    methods = list(dict.fromkeys(name for row in rows for name in row.maps))
    ncols = 1 + len(methods)
    aspects = [row.image.shape[0] / row.image.shape[1] for row in rows]
    caption_lines = max(row.caption.count("\n") + 1 for row in rows)
    fig = _figure(cell * ncols, sum(cell * a + 0.16 * caption_lines + 0.1 for a in aspects) + 0.3)
    fig.set_layout_engine("constrained", w_pad=0.02, h_pad=0.03, wspace=0.01, hspace=0.02)
    axes = fig.subplots(len(rows), ncols, squeeze=False, gridspec_kw={"height_ratios": aspects})
    for r, row in enumerate(rows):
        axes[r, 0].imshow(row.image, interpolation="nearest")
        axes[r, 0].set_title(row.caption, fontsize=7.5)
        for c, name in enumerate(methods, start=1):
            if name in row.maps:
                axes[r, c].imshow(render_map(row.image, row.maps[name], sign), interpolation="nearest")
                _note_empty(axes[r, c], row.maps[name], sign, fontsize=6.5)
            if r == 0:
                axes[r, c].set_title(name, fontsize=9, fontweight="bold")
        for ax in axes[r]:
            ax.set_axis_off()
    legend = ("red: positive relevance, blue: negative; " if sign == "all" else
              "positive relevance only; ")
    fig.supxlabel(legend + "each map scaled to its own 99.5th percentile of |relevance|",
                  fontsize=7, color="#444444")
    return save_figure(fig, path, dpi=110)


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an RGB uint8 array as PNG (fast: no figure), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, optimize=False)
    return path


# ---------------------------------------------------------------- evaluation figures

def plot_curves(curves: dict[str, dict[str, np.ndarray]], aucs: dict[str, dict[str, float]],
                protocol: str, path: Path) -> Path:
    """Mean insertion and deletion curves of every method, side by side; AUCs in the legend."""
    fig = _figure(9.0, 3.4)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, kind in zip(axes, ("insertion", "deletion"), strict=True):
        for method, kinds in curves.items():
            if kind in kinds:
                ax.plot(np.linspace(0, 1, len(kinds[kind])), kinds[kind],
                        label=f"{method} ({aucs[method][kind]:.3f})", linewidth=1.6)
        ax.set_title(f"{kind} ({protocol})", fontsize=10)
        ax.set_xlabel("fraction of pixels " + ("inserted" if kind == "insertion" else "deleted"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="method (mean AUC)", title_fontsize=7)
    axes[0].set_ylabel("probability of the scored class")
    return save_figure(fig, path, dpi=100)


def plot_conservation(panels: dict[str, dict[str, list[tuple[float, float]]]], path: Path) -> Path:
    """Relevance sum vs explained output, diagonal drawn: points on it conserve relevance."""
    fig = _figure(3.6 * len(panels), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, methods) in zip(axes, panels.items(), strict=True):
        values = [v for points in methods.values() for p in points for v in p]
        low, high = min(values + [0.0]), max(values + [1e-12])
        pad = 0.04 * (high - low)
        ax.plot([low - pad, high + pad], [low - pad, high + pad], color="#555555",
                linewidth=1, linestyle="--", label="conservation (y = x)")
        for method, points in methods.items():
            xy = np.asarray(points)
            ax.scatter(xy[:, 0], xy[:, 1], s=12, alpha=0.7, label=method)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("explained output (probability)", fontsize=8)
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("sum of relevance at the layer", fontsize=8)
    return save_figure(fig, path, dpi=100)


# ---------------------------------------------------------------- detection figures

MAP_TITLES = {
    "class": "class {name}: red for, blue against",
    "cx": "cx: red → right, blue ← left",
    "cy": "cy: red ↓ down, blue ↑ up",
    "w": "w: red wider, blue narrower",
    "h": "h: red taller, blue shorter",
    "l": "l: red left edge out, blue in",
    "t": "t: red top edge up, blue down",
    "r": "r: red right edge out, blue in",
    "b": "b: red bottom edge down, blue up",
    "ctr": "centerness: red higher, blue lower",
}
BOX_COLOUR = "#00d000"


def _draw_box(ax, box: Sequence[float], caption: str | None = None) -> None:
    x0, y0, x1, y1 = box
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=BOX_COLOUR, lw=2))
    if caption:
        ax.text(x0, y0, caption, color="black", fontsize=8, va="bottom",
                bbox={"facecolor": BOX_COLOUR, "edgecolor": "none", "pad": 1})


def draw_detections(path: str | Path, rgb: np.ndarray, boxes: Sequence[Sequence[float]],
                    captions: Sequence[str]) -> Path:
    """Save the image (H, W, 3 uint8) with every box and its caption drawn on it."""
    h, w = rgb.shape[:2]
    scale = 6.0 / max(h, w)
    fig = _figure(max(2.5, w * scale), max(2.5, h * scale))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(rgb)
    for box, caption in zip(boxes, captions, strict=True):
        _draw_box(ax, box, caption)
    ax.set_axis_off()
    fig.savefig(path, dpi=100)
    return Path(path)


def save_detection_panel(path: str | Path, rgb: np.ndarray, box: Sequence[float],
                         heats: dict[str, np.ndarray], title: str, class_name: str,
                         box_caveat: str | None = None) -> Path:
    """One detection: the image with its box, then each map (class, cx, cy, w, h) over the image;
    `box_caveat` (the box rule's, `relprop.detection.crp.BOX_RULES`) is printed under box maps."""
    fig = _figure(2.6 * (len(heats) + 1), 3.0)
    axes = fig.subplots(1, len(heats) + 1)
    axes[0].imshow(rgb)
    axes[0].set_title("detection", fontsize=9)
    _draw_box(axes[0], box)
    for ax, (name, heat) in zip(axes[1:], heats.items(), strict=True):
        ax.imshow(render_map(rgb, heat, "all"))
        _draw_box(ax, box)
        ax.set_title(MAP_TITLES.get(name, name).format(name=class_name), fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if box_caveat and set(heats) - {"class"}:
        fig.text(0.5, 0.005, box_caveat, ha="center", va="bottom", fontsize=7, color="#a00000")
    fig.savefig(path, dpi=100)
    return Path(path)
