"""Class maps on two-object scenes: does each object's class map sit in its own box, not the other's?

For each val scene of benchmarks/make_scenes.py, the two highest-scoring true-positive detections
(right class, IoU >= 0.5) of different classes are explained; for each map, the share of its
positive mass inside its own object's box and inside the other object's box (input space), and the
pointing game (is the map's maximum in its own box). Methods: CRP's contrastive class map
(``crp``), plain LRP of the class logit (``lrp-plain``), gradient x input of the class logit
(``gradxinput``). Paired comparison own − other over maps, with a 95 % bootstrap CI
(relprop.evaluation.statistics).

    python benchmarks/scene_contrast.py /tmp/scenes --checkpoint /tmp/fcos.pt --images 60
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.ops import box_iou
from torchvision.transforms.functional import to_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from relprop.detection.builders import from_metadata  # noqa: E402
from relprop.detection.crp import CRP, Request  # noqa: E402
from relprop.detection.ssd import scale_box  # noqa: E402
from relprop.evaluation.detection import class_gradient_x_input  # noqa: E402
from relprop.evaluation.statistics import mean_sem_ci, paired_comparison  # noqa: E402

METHODS = ("crp", "lrp-plain", "gradxinput")


def box_share(heat: torch.Tensor, box: torch.Tensor) -> float:
    """Share of the map's positive mass inside ``box`` (x0, y0, x1, y1, input pixels)."""
    positive = heat.clamp(min=0)
    total = float(positive.sum())
    if total <= 0:
        return float("nan")
    x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
    x1, y1 = int(torch.ceil(box[2])), int(torch.ceil(box[3]))
    return float(positive[y0:y1, x0:x1].sum()) / total


def in_box(heat: torch.Tensor, box: torch.Tensor) -> bool:
    y, x = divmod(int(heat.flatten().argmax()), heat.shape[1])
    return bool(box[0] <= x < box[2] and box[1] <= y < box[3])


def pairs(out, truth: list[dict], size) -> list[tuple[int, torch.Tensor]]:
    """(detection index, ground-truth box in input space) of the two best true positives of
    different classes."""
    det = out.detections[0]
    chosen, classes = [], set()
    for d in range(len(det["scores"])):
        label = int(det["labels"][d])
        if label in classes:
            continue
        for ann in truth:
            x, y, w, h = ann["bbox"]
            gt = torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32)
            if ann["category_id"] == label and float(box_iou(det["boxes"][d : d + 1], gt)) >= 0.5:
                chosen.append((d, scale_box(gt[0], out.original_sizes[0], size)))
                classes.add(label)
                break
        if len(chosen) == 2:
            return chosen
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenes", type=Path)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    model = from_metadata(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    crp = CRP(model.eval())
    coco = json.loads((args.scenes / "val.json").read_text())
    truth: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        truth.setdefault(ann["image_id"], []).append(ann)
    rows = {m: {"own": [], "other": [], "pointing": []} for m in METHODS}
    scenes, started = 0, time.time()
    for meta in coco["images"][: args.images]:
        image = to_tensor(Image.open(args.scenes / meta["file_name"]).convert("RGB"))
        out = crp.detect([image])
        chosen = pairs(out, truth[meta["id"]], tuple(out.x.shape[-2:]))
        if not chosen:
            continue
        scenes += 1
        requests = [Request(0, d, "class", None, c) for d, _ in chosen for c in (True, False)]
        maps = crp.explain(out, requests).sum(1)
        for i, (d, own) in enumerate(chosen):
            other = chosen[1 - i][1]
            k = int(out.detections[0]["labels"][d])
            heats = {"crp": maps[2 * i], "lrp-plain": maps[2 * i + 1],
                     "gradxinput": class_gradient_x_input(crp, out, [(d, k)])[0]}
            for m, heat in heats.items():
                rows[m]["own"].append(box_share(heat, own))
                rows[m]["other"].append(box_share(heat, other))
                rows[m]["pointing"].append(float(in_box(heat, own)))
        print(f"{scenes} scenes, {time.time() - started:.0f}s", file=sys.stderr, flush=True)
    summary = {"detector": {k: checkpoint.get(k) for k in ("arch", "map50")}, "scenes": scenes,
               "maps": 2 * scenes, "methods": {}, "command": " ".join(sys.argv)}
    lines = [f"{summary['detector']}: {scenes} scenes with two true positives of different classes", "",
             "| method | energy in own box | energy in other box | own − other (95 % CI) | pointing game |",
             "|---|---|---|---|---|"]
    for m, r in rows.items():
        own, other, pointing = mean_sem_ci(r["own"]), mean_sem_ci(r["other"]), mean_sem_ci(r["pointing"])
        diff = paired_comparison(r["own"], r["other"])
        summary["methods"][m] = {"own": own, "other": other, "pointing": pointing, "own_minus_other": diff}
        lines.append(f"| {m} | {own[0]:.3f} | {other[0]:.3f} | {diff['mean_diff']:+.3f} "
                     f"[{diff['lo']:+.3f}, {diff['hi']:+.3f}] | {pointing[0]:.2f} |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
