"""Faithfulness (Insertion, Deletion, ID score) and localization of attribution maps.

Two protocols, never to be compared with each other:

- `paper` (Otsuki et al.; the authors' `metrics/patch_insdel.py`): the 2-D map is ranked per pixel
  (or per `block` x `block` patch, by its max); frame i (i = 0..K-1, K = ceil(H*W/step)) keeps
  (insertion) or blacks out (deletion) every pixel with `map >= sorted_desc[min(step*(i+1), N-1)]`,
  ties included, so the first frame already has step+1 pixels (plus ties) changed and the last has
  all of them. Removed pixels are black in pixel space (0 before normalization), the frames are
  re-normalized in float64 as the reference does, and each frame is scored by the softmax probability
  of the **ground-truth** class.
- `rise` (Petsiuk et al. 2018): pixels in a stable descending order, `step` pixels (default: one
  image width) per frame, frames 0..ceil(H*W/step) from the start image to the finished one;
  insertion starts from a blurred copy (11x11 Gaussian, sigma 5, on the normalized tensor) and
  deletion replaces pixels by zeros of the normalized space; the **predicted** class is scored.
- `road` (Rong et al. 2022): 0, 10, ..., 90 % of the pixels removed by noisy linear imputation
  (`road.py`), the least relevant first (LeRF, in the `insertion` slot: higher is better) or the
  most relevant first (MoRF, in the `deletion` slot: lower is better); the **predicted** class.

Ties (`ties`): `reference` keeps each protocol's reference behaviour bit for bit; `random` orders
tied pixels by a permutation seeded by (`seed`, the image's id), so that a map with large ties
(Heat Quantization) gains nothing from the order its ties happen to fall in. The names live in
`protocols.py`. All score every frame of every image in large batches. AUC is the trapezoid rule
on [0, 1].
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relprop.errors import InputError
from relprop.evaluation.protocols import DEFAULT_SEED, DEFAULT_TIES, PROTOCOLS, TIES
from relprop.evaluation.road import ROAD_NOISE, ROAD_PERCENTAGES, noisy_linear_imputation

Protocol = Literal["paper", "rise", "road"]
Ties = Literal["reference", "random"]
PAPER_STEP = 500
RISE_BLUR_SIZE, RISE_BLUR_SIGMA = 11, 5.0


def auc(curve: np.ndarray | Sequence[float], dtype: Any = np.float32) -> float:
    """Normalized trapezoid area on [0, 1]: (sum - a0/2 - a_last/2) / (len - 1), as the reference.

    float32 reproduces the reference code's classification numbers; detection sums in float64.
    A one-point curve is its value, an empty one NaN.
    """
    arr = np.asarray(curve, dtype=dtype)
    if arr.shape[0] < 2:
        return float(arr[0]) if arr.shape[0] else math.nan
    return float((arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1))


def paper_thresholds(flat: np.ndarray, step: int) -> np.ndarray:
    """The paper protocol's frame thresholds of (n, N) maps: frame i (K = ceil(N / step) frames)
    holds every pixel >= the value ranked min(step * (i + 1), N - 1) in descending order (NaN last),
    ties included, so the last frame holds every pixel."""
    ordered = -np.sort(-flat, axis=1)  # descending, NaN last (numpy's argsort of -map)
    return ordered[:, paper_positions(flat.shape[1], step)]


def paper_positions(size: int, step: int) -> np.ndarray:
    """The rank (0 = most relevant) of the last pixel each paper-protocol frame holds."""
    return np.minimum(step * (np.arange(math.ceil(size / step)) + 1), size - 1)


def frame_masks(heat: Tensor, step: int = PAPER_STEP) -> Tensor:
    """(K, h, w) boolean masks of one 2-D map's paper-protocol frames (see `paper_thresholds`)."""
    flat = heat.detach().float().flatten()
    thresholds = torch.from_numpy(paper_thresholds(flat.cpu().numpy()[None], step)[0]).to(flat.device)
    return (flat[None, :] >= thresholds[:, None]).view(-1, *heat.shape)


def image_rng(seed: int, image: str, *purpose: object) -> np.random.Generator:
    """A generator of (seed, image id, purpose): the same draws whatever batch the image is in,
    whichever process scores it and however often the run resumed."""
    words = hashlib.sha256("\0".join(map(str, (image, *purpose))).encode()).digest()
    return np.random.default_rng(np.random.SeedSequence([seed, *np.frombuffer(words, np.uint32)]))


def tie_keys(seed: int, image: str, size: int) -> np.ndarray:
    """The random tie-breaking order of one image's `size` pixels (or patches): a permutation;
    among tied pixels, the smaller key comes first."""
    return image_rng(seed, image, "ties").permutation(size)


def descending_order(flat: np.ndarray, ties: str = DEFAULT_TIES, seed: int = DEFAULT_SEED,
                     ids: Sequence[str] | None = None) -> np.ndarray:
    """(n, N) pixel indices of (n, N) maps, most relevant first, NaN last: ties in raster order
    (`reference`, a stable sort) or in the order of `tie_keys` (`random`)."""
    if ties == "reference":
        return np.argsort(-flat, axis=1, kind="stable")
    ids = _ids(ids, flat.shape[0])
    keys = np.stack([tie_keys(seed, ident, flat.shape[1]) for ident in ids])
    return np.lexsort((keys, -flat), axis=1)  # sorts by -flat, then by key


def _ranks(order: np.ndarray) -> np.ndarray:
    """The inverse permutations: the rank of every pixel."""
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(order.shape[1])[None].repeat(order.shape[0], 0), axis=1)
    return ranks


def _ids(ids: Sequence[str] | None, n: int) -> list[str]:
    if ids is None:
        return [str(i) for i in range(n)]
    if len(ids) != n:
        raise InputError(f"{len(ids)} image ids for {n} maps")
    return [str(i) for i in ids]


@dataclass
class InsDelResult:
    """Per-image AUCs and the curves they come from (frames along the last axis)."""

    insertion: np.ndarray
    deletion: np.ndarray
    insertion_curves: np.ndarray
    deletion_curves: np.ndarray

    @property
    def id(self) -> np.ndarray:
        return self.insertion - self.deletion


def insertion_deletion(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    labels: Tensor | Sequence[int] | None = None,
    protocol: Protocol = "paper",
    *,
    mean: Sequence[float],
    std: Sequence[float],
    step: int | None = None,
    block: int = 1,
    batch_size: int = 64,
    ties: Ties = "reference",
    seed: int = DEFAULT_SEED,
    ids: Sequence[str] | None = None,
) -> InsDelResult:
    """Insertion and deletion of `maps` (N,H,W) on normalized `inputs` (N,3,H,W).

    `paper` scores `labels` (the ground truth); `rise` and `road` score the model's prediction on
    `inputs` (`road`: LeRF as insertion, MoRF as deletion). `step` defaults to 500 pixels (`paper`)
    or one image width (`rise`); `road` removes `ROAD_PERCENTAGES`. `ties`: see the module; random
    ties and ROAD's noise are drawn per (`seed`, `ids[i]`) (default ids: the positions), so an
    image scores the same in any batch.
    """
    if maps.ndim != 3 or maps.shape[0] != inputs.shape[0] or maps.shape[1:] != inputs.shape[2:]:
        raise InputError(f"maps {tuple(maps.shape)} must be (N,H,W) for inputs {tuple(inputs.shape)}")
    if step is not None and step < 1:
        raise InputError(f"step must be >= 1, got {step}")
    if ties not in TIES:
        raise InputError(f"ties must be one of {', '.join(TIES)}, got {ties!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed!r}")
    order = _Order(ties, int(seed), _ids(ids, maps.shape[0]))
    device = next(model.parameters()).device
    inputs = inputs.detach().to(device)
    if protocol == "paper":
        if labels is None:
            raise InputError("the paper protocol scores the ground-truth class: pass labels")
        frames: _Frames = _PaperFrames(inputs, maps, mean, std, step or PAPER_STEP, block, order)
        classes = torch.as_tensor(labels, device=device).long().reshape(-1)
    elif protocol in ("rise", "road"):
        frames = (_RiseFrames(inputs, maps, step or inputs.shape[-1], order) if protocol == "rise"
                  else RoadFrames(inputs, maps, order))
        with torch.no_grad():
            classes = model(inputs).argmax(dim=1)
    else:
        raise InputError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    curves = _score(model, frames, classes, batch_size)
    ins, dels = curves["insertion"], curves["deletion"]
    return InsDelResult(
        insertion=np.array([auc(c) for c in ins], dtype=np.float64),
        deletion=np.array([auc(c) for c in dels], dtype=np.float64),
        insertion_curves=ins,
        deletion_curves=dels,
    )


def _insertion(result: InsDelResult, i: int) -> float:
    return float(result.insertion[i])


def _deletion(result: InsDelResult, i: int) -> float:
    return float(result.deletion[i])


def _id(result: InsDelResult, i: int) -> float:
    return float(result.insertion[i] - result.deletion[i])


@dataclass(frozen=True)
class Metric:
    """A per-image score of the faithfulness protocols: its table title, which way is better,
    and how it is read off an image's insertion/deletion result."""

    title: str
    arrow: str  # "↑": higher is better, "↓": lower is better
    score: Callable[[InsDelResult, int], float]


# The metric list: results.jsonl, summary.json, summary.md and the report read it generically, so a
# new metric is one function above and one entry here.
METRICS: dict[str, Metric] = {
    "insertion": Metric("Insertion", "↑", _insertion),
    "deletion": Metric("Deletion", "↓", _deletion),
    "id": Metric("ID", "↑", _id),
}
LOCALIZATION = ("pointing", "energy", "centre_pointing", "centre_energy")


@dataclass(frozen=True)
class _Order:
    """How pixels are ranked: the tie mode, its seed and the images' ids."""

    ties: str
    seed: int
    ids: list[str]

    def descending(self, flat: np.ndarray) -> np.ndarray:
        return descending_order(flat, self.ties, self.seed, self.ids)


class _Frames:
    """The frames of one protocol, made on demand so memory stays bounded at any image size."""

    count: int

    def make(self, image: int, kind: str, index: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class _PaperFrames(_Frames):
    def __init__(self, inputs: Tensor, maps: Tensor, mean: Sequence[float], std: Sequence[float],
                 step: int, block: int, order: _Order | None = None) -> None:
        n, _, height, width = inputs.shape
        if block < 1 or height % block or width % block:
            raise InputError(f"block {block} must divide the input size {height}x{width}")
        self.block = block
        self.mean = torch.tensor(mean, dtype=torch.float64, device=inputs.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float64, device=inputs.device).view(1, 3, 1, 1)
        # Back to pixel space in float32 as the reference does, then masked and re-normalized in
        # float64 before the model sees float32 again.
        x = inputs.float().cpu().numpy()
        m32 = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
        s32 = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
        self.pixels = torch.from_numpy(x * s32 + m32).to(inputs.device, torch.float64)
        patches = maps.detach().float().cpu()
        if block > 1:
            patches = F.max_pool2d(patches[:, None], block)[:, 0]
        self.patches = patches.to(inputs.device)
        flat = patches.reshape(n, -1).numpy()
        self.ranks = None
        if order is None or order.ties == "reference":  # the authors' thresholds, ties included
            thresholds = paper_thresholds(flat, step)
            self.count = thresholds.shape[1]
            self.thresholds = torch.from_numpy(thresholds).to(inputs.device)
        else:  # frame i holds exactly the pixels ranked <= its position in the tie-broken order
            positions = paper_positions(flat.shape[1], step)
            self.count = positions.shape[0]
            self.positions = torch.from_numpy(positions).to(inputs.device)
            self.ranks = torch.from_numpy(_ranks(order.descending(flat))).view(patches.shape).to(
                inputs.device)

    def make(self, image: int, kind: str, index: Tensor) -> Tensor:
        if self.ranks is None:
            keep = self.patches[image][None] >= self.thresholds[image][index].view(-1, 1, 1)
        else:
            keep = self.ranks[image][None] <= self.positions[index].view(-1, 1, 1)
        if self.block > 1:
            keep = keep.repeat_interleave(self.block, 1).repeat_interleave(self.block, 2)
        if kind == "deletion":
            keep = ~keep
        mask = keep[:, None].to(torch.float64)
        return ((self.pixels[image][None] * mask - self.mean) / self.std).float()


class _RiseFrames(_Frames):
    def __init__(self, inputs: Tensor, maps: Tensor, step: int, order: _Order | None = None) -> None:
        n, _, height, width = inputs.shape
        self.inputs = inputs.float()
        self.blurred = rise_blur(self.inputs)
        flat = maps.detach().float().cpu().reshape(n, -1).numpy()
        ranks = _ranks((order or _Order("reference", 0, [])).descending(flat))
        self.ranks = torch.from_numpy(ranks).view(n, height, width).to(inputs.device)
        self.step = step
        self.count = math.ceil(height * width / step) + 1

    def make(self, image: int, kind: str, index: Tensor) -> Tensor:
        changed = (self.ranks[image][None] < (index * self.step).view(-1, 1, 1))[:, None]
        x = self.inputs[image][None]
        if kind == "insertion":
            return torch.where(changed, x, self.blurred[image][None])
        return torch.where(changed, torch.zeros_like(x), x)


class RoadFrames(_Frames):
    """ROAD's frames: `percentages` of the pixels removed by noisy linear imputation of the
    normalized input, the most relevant first (`deletion`: MoRF) or the least (`insertion`: LeRF).
    Frame j of image i removes int(H*W * p_j / 100) pixels (Quantus's count); its noise is drawn
    from (seed, image id, kind, p_j)."""

    def __init__(self, inputs: Tensor, maps: Tensor, order: _Order,
                 percentages: Sequence[int] = ROAD_PERCENTAGES, noise: float = ROAD_NOISE) -> None:
        if not all(0 <= p < 100 for p in percentages):
            raise InputError(f"ROAD removes 0 to 99 % of the pixels, got {list(percentages)}")
        n = inputs.shape[0]
        self.device, self.order, self.noise = inputs.device, order, noise
        self.images = inputs.detach().double().cpu().numpy()
        self.pixel_order = order.descending(maps.detach().float().cpu().reshape(n, -1).numpy())
        self.percentages = list(percentages)
        self.count = len(self.percentages)

    def removed(self, image: int, kind: str, percentage: int) -> np.ndarray:
        """The pixels frame `percentage` of `kind` removes (flat indices)."""
        size = self.pixel_order.shape[1]
        count = size * percentage // 100
        ranked = self.pixel_order[image]
        return ranked[:count] if kind == "deletion" else ranked[size - count:]

    def make(self, image: int, kind: str, index: Tensor) -> Tensor:
        frames = []
        for j in index.tolist():
            p = self.percentages[j]
            rng = image_rng(self.order.seed, self.order.ids[image], "road", kind, p)
            frames.append(noisy_linear_imputation(self.images[image], self.removed(image, kind, p),
                                                  self.noise, rng))
        return torch.from_numpy(np.stack(frames)).to(self.device, torch.float32)


def rise_kernel(size: int = RISE_BLUR_SIZE, sigma: float = RISE_BLUR_SIGMA) -> Tensor:
    """RISE's blur kernel: a `size` x `size` delta smoothed by a Gaussian (radius 4 sigma, edges
    reflected), i.e. the outer product of the 1-D response computed here."""
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    centre, period = size // 2, 2 * size
    response = np.zeros(size)
    for i in range(size):
        for offset, weight in zip(offsets, weights, strict=True):
            j = (i + offset) % period
            j = j if j < size else period - 1 - j  # half-sample symmetric reflection
            response[i] += weight * (j == centre)
    return torch.from_numpy(np.outer(response, response).astype(np.float32))


def rise_blur(inputs: Tensor) -> Tensor:
    """Per-channel RISE blur of normalized inputs (zero padding, as its conv2d does)."""
    kernel = rise_kernel().to(inputs.device, inputs.dtype)
    weight = kernel[None, None].repeat(inputs.shape[1], 1, 1, 1)
    return F.conv2d(inputs, weight, padding=kernel.shape[-1] // 2, groups=inputs.shape[1])


def _score(model: nn.Module, frames: _Frames, classes: Tensor, batch_size: int) -> dict[str, np.ndarray]:
    """Softmax probability of `classes[image]` for every frame, frames of all images batched."""
    n = classes.shape[0]
    curves = {kind: np.zeros((n, frames.count), dtype=np.float32) for kind in ("insertion", "deletion")}
    jobs = [(i, kind) for i in range(n) for kind in curves]
    queue: list[tuple[int, str, int, int]] = []  # image, kind, first frame, frame count
    pending = 0
    for i, kind in jobs:
        start = 0
        while start < frames.count:
            take = min(frames.count - start, batch_size - pending)
            queue.append((i, kind, start, take))
            pending += take
            start += take
            if pending == batch_size:
                _run(model, frames, classes, queue, curves)
                queue, pending = [], 0
    if queue:
        _run(model, frames, classes, queue, curves)
    return curves


def _run(model: nn.Module, frames: _Frames, classes: Tensor,
         queue: list[tuple[int, str, int, int]], curves: dict[str, np.ndarray]) -> None:
    device = classes.device
    batch = torch.cat([
        frames.make(i, kind, torch.arange(start, start + take, device=device))
        for i, kind, start, take in queue
    ])
    owners = torch.cat([torch.full((take,), i, device=device) for i, _, _, take in queue])
    with torch.no_grad():
        probs = torch.softmax(model(batch), dim=1)
    scores = probs.gather(1, classes[owners][:, None])[:, 0].float().cpu().numpy()
    # no nan_to_num: a NaN model must not score 0; the evaluation records such a row as failed
    offset = 0
    for i, kind, start, take in queue:
        curves[kind][i, start:start + take] = scores[offset:offset + take]
        offset += take


def localization(
    maps: Tensor, boxes: Sequence[Sequence[float] | Tensor | None], *,
    pointing: Literal["share", "first"] = "share",
) -> list[dict[str, float | None] | None]:
    """Pointing game and energy inside the box, beside the same scores of a centre-point baseline.

    Boxes are (x0, y0, x1, y1) in input pixels (right/bottom edges exclusive); a pixel is inside
    when its centre is. `pointing` is the share of the map's maximal pixels inside the box (1 or 0
    for a unique maximum; quantized maps have plateaus); `energy` the share of the positive map
    inside the box. The baseline points at the image centre and spreads energy uniformly, which
    scores high where boxes are large (tin10). `pointing="first"` scores the first maximum in
    raster order instead (1 or 0 always; the detection evaluation's published convention).
    """
    maps = maps.detach().float().cpu()
    _, height, width = maps.shape
    ys = torch.arange(height, dtype=torch.float64)[:, None] + 0.5
    xs = torch.arange(width, dtype=torch.float64)[None, :] + 0.5
    results: list[dict[str, float | None] | None] = []
    for heat, box in zip(maps, boxes, strict=True):
        if box is None:
            results.append(None)
            continue
        x0, y0, x1, y1 = (float(v) for v in box)
        inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
        peak = heat == heat.max()
        positive = heat.clamp(min=0).double()
        total = float(positive.sum())
        centre = x0 <= width / 2 <= x1 and y0 <= height / 2 <= y1
        if pointing == "first":
            hit = float(inside.flatten()[int(heat.flatten().argmax())])
        else:
            hit = float((peak & inside).sum()) / max(int(peak.sum()), 1)
        results.append({
            "pointing": hit,
            "energy": float(positive[inside].sum()) / total if total > 0 else None,
            "centre_pointing": float(centre),
            "centre_energy": float(inside.sum()) / (height * width),
        })
    return results
