"""Labelled evaluation images with optional boxes, in the layouts researchers already have.

- class folders (`ROOT/<class>/*.jpg`, torchvision's ImageFolder; ImageNet's `val/<wnid>/`), with
  an optional `boxes.txt` per folder (`file x0 y0 x1 y1`, inclusive pixels: the tin10 layout);
- ImageNet's flat validation folder (`ILSVRC2012_val_*.JPEG`) with Kaggle's `LOC_val_solution.csv`
  in the folder or one of its parents (the ground-truth wnid is the first of each PredictionString);
- a flat folder of files whose names start with their wnid (`n01440764_tench.JPEG`);
- CUB_200_2011 (`images.txt`, `train_test_split.txt`, `image_class_labels.txt`,
  `bounding_boxes.txt`): the test split, as the paper evaluated it.

Labels always come from the model's own class list (`classes`, the ids such as wnids, and
`class_names`), matched by the folder's (or file's) class name: images of classes the model does
not have are left out and counted in `Dataset.unknown`; data with no class of the model is refused.
Without a model (`classes=None`) the labels are the sorted class names' indices.

Boxes are kept in the source image's continuous pixel coordinates (`x0, y0, x1, y1`, right and
bottom edges exclusive) and mapped to the model input by `scale_box`, which follows the
checkpoint's Resize/CenterCrop exactly.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from relprop.errors import InputError
from relprop.images import IMAGE_SUFFIXES, load_image
from relprop.modelinfo import ModelInfo, Preprocessing, as_preprocessing

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Item:
    """One evaluation image: `path` relative to the data root, class index, source-pixel box."""

    path: str
    label: int
    box: Box | None = None


@dataclass(frozen=True)
class Dataset:
    """The images found; `unknown`: {class name: images} of classes the model does not have."""

    root: Path
    layout: str
    items: list[Item]
    unknown: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Found:
    """An image and the names its class may go by (folder name, wnid, CUB class name, ...)."""

    path: str
    names: tuple[str, ...]
    box: Box | None = None


def discover(root: str | Path, classes: Sequence[str] | None = None,
             class_names: Sequence[str] | None = None) -> Dataset:
    """Find the images under `root` and label them by the model's `classes` / `class_names`."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--data {root}: no such directory")
    if (root / "images.txt").is_file() and (root / "image_class_labels.txt").is_file():
        layout, found = "cub", _cub_items(root)
    elif any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        found = _folder_items(root)
        layout = "tin10" if any(f.box is not None for f in found) else "imagefolder"
    else:
        layout, found = _flat_items(root)
    items, unknown = _label(root, found, classes, class_names)
    return Dataset(root, layout, items, unknown)


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


def scale_box(box: Box, source_size: tuple[int, int], spec: Preprocessing | ModelInfo) -> Box:
    """Map a box from the source image (width, height) to the input the preprocessing produces."""
    steps = as_preprocessing(spec)
    width, height = source_size
    new_w, new_h = _resized_size(width, height, steps.resize)
    sx, sy = new_w / width, new_h / height
    x0, y0, x1, y1 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    if steps.crop:
        crop_h, crop_w = _pair(steps.crop)
        # torchvision's CenterCrop offsets
        top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
        x0, x1 = min(max(x0 - left, 0.0), crop_w), min(max(x1 - left, 0.0), crop_w)
        y0, y1 = min(max(y0 - top, 0.0), crop_h), min(max(y1 - top, 0.0), crop_h)
    return (x0, y0, x1, y1)


def load_item(root: Path, item: Item, transform,
              spec: Preprocessing | ModelInfo) -> tuple[torch.Tensor, Box | None]:
    """Read, preprocess; the box comes back in input coordinates. Raises ImageError if unreadable."""
    image = load_image(root / item.path)
    box = scale_box(item.box, image.size, spec) if item.box is not None else None
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
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _label(root: Path, found: Sequence[_Found], classes: Sequence[str] | None,
           class_names: Sequence[str] | None) -> tuple[list[Item], dict[str, int]]:
    """Items labelled by the model's classes; unknown classes counted; no match at all refused."""
    if classes is None:  # no model: the sorted class names, as torchvision's ImageFolder
        index = {name: i for i, name in enumerate(sorted({f.names[0] for f in found}))}
        return [Item(f.path, index[f.names[0]], f.box) for f in found], {}
    lookup = _class_lookup(classes, class_names)
    items, unknown = [], {}
    for f in found:
        label = next((lookup[_key(n)] for n in f.names if _key(n) in lookup), None)
        if label is None:
            unknown[f.names[0]] = unknown.get(f.names[0], 0) + 1
        else:
            items.append(Item(f.path, label, f.box))
    if not items:
        theirs = sorted(unknown)
        raise InputError(
            f"--data {root}: none of its {len(theirs)} classes ({_few(theirs)}) is a class of the "
            f"model, whose {len(classes)} classes are {_few(list(classes))}; name the class folders "
            "by the model's class ids or names, or give the model's classes with --classes FILE"
        )
    return items, unknown


def _class_lookup(classes: Sequence[str], class_names: Sequence[str] | None) -> dict[str, int]:
    """Normalized class id or name -> index; ids win over names, the first of equal names wins."""
    lookup: dict[str, int] = {}
    for labels in (class_names or [], classes):  # ids last, so they override names
        for i, label in enumerate(labels):
            key = _key(str(label))
            if labels is classes or key not in lookup:
                lookup[key] = i
    return lookup


def _key(name: str) -> str:
    """Folder and file names spell spaces as underscores and vary in case."""
    return " ".join(name.replace("_", " ").split()).casefold()


def _few(names: Sequence[str], shown: int = 5) -> str:
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _folder_items(root: Path) -> list[_Found]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = []
    for folder in folders:
        boxes = _read_boxes(folder / "boxes.txt")
        for path in sorted(p for p in folder.iterdir() if _is_image(p)):
            items.append(_Found(f"{folder.name}/{path.name}", (folder.name,), boxes.get(path.name)))
    if not items:
        raise InputError(f"--data {root}: no images in its class folders")
    return items


_WNID_NAME = re.compile(r"^(n\d{8})_")
_SOLUTION = "LOC_val_solution.csv"


def _flat_items(root: Path) -> tuple[str, list[_Found]]:
    """A flat folder: ImageNet val with Kaggle's solution CSV, or files named `<wnid>_...`."""
    images = sorted(p for p in root.iterdir() if _is_image(p))
    if not images:
        raise InputError(f"--data {root}: no class folders and no images (expected ROOT/<class>/"
                         "<image>, ImageNet val with LOC_val_solution.csv, or CUB_200_2011)")
    solution = next((d / _SOLUTION for d in [root, *root.parents][:5] if (d / _SOLUTION).is_file()),
                    None)
    if solution is not None and any(p.name.startswith("ILSVRC2012_val_") for p in images):
        truth = _read_solution(solution)
        missing = [p.name for p in images if p.stem not in truth]
        if missing:
            raise InputError(f"--data {root}: {len(missing)} images are not in {solution} "
                             f"(e.g. {missing[0]})")
        return "imagenet-val", [_Found(p.name, (truth[p.stem],)) for p in images]
    unnamed = [p.name for p in images if not _WNID_NAME.match(p.name)]
    if unnamed:
        hint = (f"ImageNet val needs {_SOLUTION} (Kaggle) in the folder or a parent; the devkit's "
                "numbered ground truth is not read, sort the images into wnid folders instead"
                if any(n.startswith("ILSVRC2012_val_") for n in unnamed) else
                "put the images in class folders, or start their names with their wnid")
        raise InputError(f"--data {root}: cannot tell the class of {unnamed[0]} ({hint})")
    return "wnid-names", [_Found(p.name, (_WNID_NAME.match(p.name).group(1),)) for p in images]


def _read_solution(path: Path) -> dict[str, str]:
    """Kaggle's `ImageId,PredictionString` (`wnid x0 y0 x1 y1 ...`): image id -> its wnid."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows}
    except (KeyError, IndexError, csv.Error, UnicodeDecodeError):
        raise InputError(f"{path}: not Kaggle's LOC_val_solution.csv "
                         "(ImageId,PredictionString with 'wnid x0 y0 x1 y1 ...')") from None


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


def _cub_items(root: Path) -> list[_Found]:
    """CUB test split (`train_test_split.txt` flag 0), with its boxes (x, y, width, height).

    A class goes by its folder name (`001.Black_footed_Albatross`), the name without the number
    (`Black_footed_Albatross`) and, for models whose classes are plain indices, `class id - 1`.
    """
    images = _table(root / "images.txt")
    split = _table(root / "train_test_split.txt")
    labels = _table(root / "image_class_labels.txt")
    boxes = _table(root / "bounding_boxes.txt") if (root / "bounding_boxes.txt").is_file() else {}
    items = []
    for image_id, (rel, *_) in images.items():
        if split.get(image_id, ["1"])[0] != "0":
            continue
        folder = rel.split("/")[0]
        names = (folder, folder.split(".", 1)[-1], str(int(labels[image_id][0]) - 1))
        box = None
        if image_id in boxes:
            x, y, w, h = (float(v) for v in boxes[image_id])
            box = (x, y, x + w, y + h)
        items.append(_Found(f"images/{rel}", names, box))
    if not items:
        raise InputError(f"CUB_200_2011 layout in {root}: no test images (flag 0 in train_test_split.txt)")
    return items
