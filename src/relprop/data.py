"""Labelled evaluation images with optional boxes, in the layouts researchers already have.

- class folders (`ROOT/<class>/*.jpg`, torchvision's ImageFolder; ImageNet's `val/<wnid>/`), with
  an optional `boxes.txt` per folder (`file x0 y0 x1 y1`, inclusive pixels: the tin10 layout);
- CUB_200_2011 (`images.txt`, `train_test_split.txt`, `image_class_labels.txt`,
  `bounding_boxes.txt`): the test split, as the paper evaluated it.

Boxes are kept in the source image's continuous pixel coordinates (`x0, y0, x1, y1`, right and
bottom edges exclusive) and mapped to the model input by `scale_box`, which follows the
checkpoint's Resize/CenterCrop exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from relprop.errors import InputError

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Item:
    """One evaluation image: `path` relative to the data root, class index, source-pixel box."""

    path: str
    label: int
    box: Box | None = None


@dataclass(frozen=True)
class Dataset:
    root: Path
    layout: str
    items: list[Item]


def discover(root: str | Path, classes: Sequence[str] | None = None) -> Dataset:
    """Find the images under `root`; class folder names are mapped through the model's `classes`."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--data {root}: no such directory")
    if (root / "images.txt").is_file() and (root / "image_class_labels.txt").is_file():
        return Dataset(root, "cub", _cub_items(root, classes))
    items = _folder_items(root, classes)
    layout = "tin10" if any(it.box is not None for it in items) else "imagefolder"
    return Dataset(root, layout, items)


def select(items: Sequence[Item], per_class: int | None = None, limit: int | None = None) -> list[Item]:
    """The first `per_class` images of each class (the paper's 1 or 5 per class), then `limit`."""
    chosen = list(items)
    if per_class is not None:
        counts: dict[int, int] = {}
        kept = []
        for item in chosen:
            counts[item.label] = counts.get(item.label, 0) + 1
            if counts[item.label] <= per_class:
                kept.append(item)
        chosen = kept
    return chosen[:limit] if limit is not None else chosen


def scale_box(box: Box, source_size: tuple[int, int], meta: Mapping[str, Any]) -> Box:
    """Map a box from the source image (width, height) to the input the preprocessing produces."""
    width, height = source_size
    new_w, new_h = _resized_size(width, height, meta["resize"])
    sx, sy = new_w / width, new_h / height
    x0, y0, x1, y1 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    if meta.get("crop"):
        crop_h, crop_w = _pair(meta["crop"])
        # torchvision's CenterCrop offsets
        top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
        x0, x1 = min(max(x0 - left, 0.0), crop_w), min(max(x1 - left, 0.0), crop_w)
        y0, y1 = min(max(y0 - top, 0.0), crop_h), min(max(y1 - top, 0.0), crop_h)
    return (x0, y0, x1, y1)


def load_item(root: Path, item: Item, transform, meta: Mapping[str, Any]) -> tuple[torch.Tensor, Box | None]:
    """Read, preprocess; the box comes back in input coordinates. Raises ImageError if unreadable."""
    from relprop.images import load_image

    image = load_image(root / item.path)
    box = scale_box(item.box, image.size, meta) if item.box is not None else None
    return transform(image), box


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of a torchvision size argument."""
    if isinstance(size, int | float):
        return int(size), int(size)
    return (int(size[0]), int(size[0])) if len(size) == 1 else (int(size[0]), int(size[1]))


def _resized_size(width: int, height: int, resize: int | Sequence[int]) -> tuple[int, int]:
    """(width, height) after torchvision's Resize: an int sets the shorter side."""
    if not isinstance(resize, int | float) and len(resize) == 2:
        return int(resize[1]), int(resize[0])
    short = int(resize if isinstance(resize, int | float) else resize[0])
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def _is_image(path: Path) -> bool:
    from relprop.images import IMAGE_SUFFIXES

    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _class_index(names: Sequence[str], classes: Sequence[str] | None) -> dict[str, int]:
    """Folder names that are the model's classes keep the model's order; otherwise sorted order."""
    if classes is not None and all(name in classes for name in names):
        return {name: list(classes).index(name) for name in names}
    return {name: i for i, name in enumerate(sorted(names))}


def _folder_items(root: Path, classes: Sequence[str] | None) -> list[Item]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"--data {root}: no class folders (expected ROOT/<class>/<image> or CUB_200_2011)")
    index = _class_index([f.name for f in folders], classes)
    items = []
    for folder in folders:
        boxes = _read_boxes(folder / "boxes.txt")
        for path in sorted(p for p in folder.iterdir() if _is_image(p)):
            items.append(Item(f"{folder.name}/{path.name}", index[folder.name], boxes.get(path.name)))
    if not items:
        raise InputError(f"--data {root}: no images in its class folders")
    return items


def _read_boxes(path: Path) -> dict[str, Box]:
    """tin10 `boxes.txt`: `file x0 y0 x1 y1`, inclusive pixel indices -> continuous edges."""
    if not path.is_file():
        return {}
    boxes = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) == 5:
            x0, y0, x1, y1 = (float(v) for v in fields[1:])
            boxes[fields[0]] = (x0, y0, x1 + 1.0, y1 + 1.0)
    return boxes


def _table(path: Path) -> dict[str, list[str]]:
    """CUB's `id value...` text files."""
    if not path.is_file():
        raise InputError(f"CUB_200_2011 layout: missing {path}")
    rows = (line.split() for line in path.read_text().splitlines())
    return {row[0]: row[1:] for row in rows if row}


def _cub_items(root: Path, classes: Sequence[str] | None) -> list[Item]:
    """CUB test split (`train_test_split.txt` flag 0); label = class id - 1 unless names match."""
    images = _table(root / "images.txt")
    split = _table(root / "train_test_split.txt")
    labels = _table(root / "image_class_labels.txt")
    boxes = _table(root / "bounding_boxes.txt") if (root / "bounding_boxes.txt").is_file() else {}
    folder_names = sorted({rel[0].split("/")[0] for rel in images.values()})
    by_name = classes is not None and all(name in classes for name in folder_names)
    items = []
    for image_id, (rel,) in images.items():
        if split.get(image_id, ["1"])[0] != "0":
            continue
        label = list(classes).index(rel.split("/")[0]) if by_name else int(labels[image_id][0]) - 1
        box = None
        if image_id in boxes:
            x, y, w, h = (float(v) for v in boxes[image_id])
            box = (x, y, x + w, y + h)
        items.append(Item(f"images/{rel}", label, box))
    return items
