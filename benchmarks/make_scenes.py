"""Multi-object detection scenes composed from tin10's boxed objects, reproducible by seed.

Each scene is a canvas of 224-320 px (a random flat colour with mild noise) holding 2-5 objects of
different classes, each cropped by its tin10 box, rescaled and pasted where it overlaps no earlier
object by more than ``--max-overlap`` (IoU). Written as COCO detection json (``train.json``,
``val.json``; category ids 1..10 in classes.tsv order, so 0 stays the background, as torchvision's
detectors expect) next to the images: readable by pycocotools, torchmetrics and
``torchvision.datasets.CocoDetection``. Scenes of the train split take objects from tin10 train,
val scenes from tin10 val. Never commit the output folder.

    python benchmarks/make_scenes.py /tmp/scenes --seed 0 --train 600 --val 120
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

TIN10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tin10"
CANVAS = (224, 320)
OBJECTS = (2, 5)
OBJECT_SIDE = (56, 128)  # longer side of a pasted object, pixels
MAX_OVERLAP = 0.1
PLACEMENT_TRIES = 50


@dataclass(frozen=True)
class Source:
    """One boxed tin10 object: image file, class index (classes.tsv order), box x0 y0 x1 y1 (inclusive)."""

    path: Path
    label: int
    box: tuple[int, int, int, int]


def read_classes(root: Path) -> list[tuple[str, str]]:
    """(wnid, first name) of each class, in classes.tsv order."""
    rows = [line.split("\t") for line in (root / "classes.tsv").read_text().splitlines() if line.strip()]
    return [(row[0], row[1].split(",")[0].strip() if len(row) > 1 else row[0]) for row in rows]


def read_sources(root: Path, split: str, wnids: list[str]) -> dict[int, list[Source]]:
    """The boxed objects of ``root/split``, by class index."""
    sources: dict[int, list[Source]] = {}
    for label, wnid in enumerate(wnids):
        folder = root / split / wnid
        rows = [line.split() for line in (folder / "boxes.txt").read_text().splitlines() if line.strip()]
        sources[label] = [Source(folder / r[0], label, tuple(int(v) for v in r[1:5])) for r in rows]
    return sources


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU of two (x0, y0, x1, y1) boxes with exclusive ends."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def crop_object(source: Source, side: int) -> Image.Image:
    """The object cut out by its box, resized so that its longer side is ``side`` pixels."""
    x0, y0, x1, y1 = source.box
    crop = Image.open(source.path).convert("RGB").crop((x0, y0, x1 + 1, y1 + 1))
    scale = side / max(crop.size)
    size = (max(8, round(crop.size[0] * scale)), max(8, round(crop.size[1] * scale)))
    return crop.resize(size, Image.BILINEAR)


def background(rng: random.Random, width: int, height: int) -> Image.Image:
    """A flat random colour with mild per-pixel noise (seeded)."""
    colour = np.array([rng.randint(40, 215) for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8))


def compose(rng: random.Random, sources: dict[int, list[Source]],
            max_overlap: float = MAX_OVERLAP) -> tuple[Image.Image, list[tuple[int, tuple[int, ...]]]]:
    """One scene and its objects as (class index, (x0, y0, x1, y1) exclusive-end pixel box); a
    draw where fewer than two objects found a place is drawn again."""
    while True:
        canvas, placed = _compose_once(rng, sources, max_overlap)
        if len(placed) >= OBJECTS[0]:
            return canvas, placed


def _compose_once(rng: random.Random, sources: dict[int, list[Source]],
                  max_overlap: float) -> tuple[Image.Image, list[tuple[int, tuple[int, ...]]]]:
    width, height = rng.randint(*CANVAS), rng.randint(*CANVAS)
    canvas = background(rng, width, height)
    labels = rng.sample(sorted(sources), rng.randint(*OBJECTS))
    placed: list[tuple[int, tuple[int, ...]]] = []
    for label in labels:
        obj = crop_object(rng.choice(sources[label]), rng.randint(*OBJECT_SIDE))
        w, h = obj.size
        for _ in range(PLACEMENT_TRIES):
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            box = (x, y, x + w, y + h)
            if all(iou(box, other) <= max_overlap for _, other in placed):
                canvas.paste(obj, (x, y))
                placed.append((label, box))
                break
    return canvas, placed


def write_split(out: Path, split: str, count: int, seed: int, root: Path,
                classes: list[tuple[str, str]]) -> Path:
    """``count`` scenes of one split under ``out/split/`` and their COCO json ``out/split.json``."""
    sources = read_sources(root, split, [wnid for wnid, _ in classes])
    rng = random.Random(f"{seed}-{split}")
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        canvas, objects = compose(rng, sources)
        name = f"{split}_{i:05d}.png"
        canvas.save(folder / name)
        images.append({"id": i + 1, "file_name": f"{split}/{name}", "width": canvas.width, "height": canvas.height})
        for label, (x0, y0, x1, y1) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                "iscrowd": 0})
    categories = [{"id": k + 1, "name": name, "wnid": wnid} for k, (wnid, name) in enumerate(classes)]
    path = out / f"{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories,
                                "info": {"seed": seed, "source": "tin10", "split": split}}))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder (not committed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=600, help="train scenes")
    parser.add_argument("--val", type=int, default=120, help="val scenes")
    parser.add_argument("--tin10", type=Path, default=TIN10, help="tin10 folder (classes.tsv, train/, val/)")
    args = parser.parse_args(argv)
    if not (args.tin10 / "classes.tsv").is_file():
        print(f"make_scenes: error: {args.tin10}: no tin10 folder (classes.tsv)", file=sys.stderr)
        return 2
    classes = read_classes(args.tin10)
    for split, count in (("train", args.train), ("val", args.val)):
        path = write_split(args.out, split, count, args.seed, args.tin10, classes)
        print(f"{path}: {count} scenes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
