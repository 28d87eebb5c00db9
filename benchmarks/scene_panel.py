"""The README's detection picture: one scene, two objects of different classes, each with its own
class map, CRP (contrastive) above plain LRP of the class logit.

The scene is not chosen by its maps: among the first ``--scenes`` val scenes with two true positives
of different classes (relprop.evaluation.scenes.explained_pair), the one whose weaker detection
scores highest.

    python benchmarks/scene_panel.py /tmp/scenes/val.json --checkpoint /tmp/fcos.pt \
        --out docs/img/crp-two-objects.png
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from relprop.detection.crp import CRP, Request, to_image  # noqa: E402
from relprop.evaluation.scenes import explained_pair, read_scenes  # noqa: E402
from relprop.images import load_image  # noqa: E402
from relprop.models import class_names_of, load_detector  # noqa: E402
from relprop.viz import render_map  # noqa: E402

COLOURS = ("#00e5ff", "#ffd400")


def best_scene(crp: CRP, scenes, count: int):
    """(scene, detector output, pair) of the scene whose weaker explained detection scores highest."""
    best, best_score = None, -1.0
    for scene in scenes[:count]:
        image = torch.from_numpy(np.array(load_image(scene.path))).permute(2, 0, 1).float() / 255
        out = crp.detect([image])
        pair = explained_pair(out, scene)
        if pair:
            score = min(float(out.detections[0]["scores"][d]) for d, _ in pair)
            if score > best_score:
                best, best_score = (scene, out, pair), score
    if best is None:
        raise SystemExit(f"none of the first {count} scenes has two true positives of different classes")
    return best


def draw(path: Path, rgb: np.ndarray, boxes, captions, maps: dict[str, list[np.ndarray]]) -> None:
    fig = Figure(figsize=(3 * 3, 3 * len(maps)))
    axes = fig.subplots(len(maps), 3, squeeze=False)
    for row, (method, heats) in enumerate(maps.items()):
        axes[row, 0].imshow(rgb)
        axes[row, 0].set_title(f"two detections; {method} maps →", fontsize=9)
        for box, colour in zip(boxes, COLOURS, strict=True):
            _box(axes[row, 0], box, colour)
        for i, heat in enumerate(heats):
            axes[row, i + 1].imshow(render_map(rgb, heat, "all"))
            _box(axes[row, i + 1], boxes[i], COLOURS[i])
            axes[row, i + 1].set_title(f"{method}: {captions[i]}", fontsize=9)
        for ax in axes[row]:
            ax.set_axis_off()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=90)
    with Image.open(buffer) as image:  # a 256-colour palette, as tools/make_docs_images.py saves
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _box(ax, box, colour: str) -> None:
    x0, y0, x1, y1 = box
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, lw=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenes", type=Path, help="a COCO json of benchmarks/make_scenes.py")
    parser.add_argument("--checkpoint", required=True, help="a detector checkpoint (train_detectors.py)")
    parser.add_argument("--scenes", type=int, default=40, dest="count", help="scenes searched (default 40)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, info = load_detector(args.checkpoint)
    names = class_names_of(info, detector=True)
    crp = CRP(model)
    scene, out, pair = best_scene(crp, read_scenes(args.scenes, info.classes, names), args.count)
    det = out.detections[0]
    requests = [Request(0, d, "class", None, contrast) for contrast in (True, False) for d, _ in pair]
    relevance = crp.explain(out, requests)
    size = out.original_sizes[0]
    heats = [to_image(r, size).numpy() for r in relevance]
    maps = {"CRP": heats[:2], "plain LRP": heats[2:]}
    captions = [f"{names[int(det['labels'][d])]} {float(det['scores'][d]):.0%}" for d, _ in pair]
    boxes = [det["boxes"][d].tolist() for d, _ in pair]
    rgb = np.asarray(load_image(scene.path))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(args.out, rgb, boxes, captions, maps)
    print(f"{scene.path.name}: {', '.join(captions)} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
