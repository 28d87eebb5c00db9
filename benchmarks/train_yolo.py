"""Train an Ultralytics YOLOv8 on the tin10 scenes (benchmarks/make_scenes.py) and save it for relprop.

Needs the ``yolo`` extra (``pip install -e ".[yolo]"``: Ultralytics, AGPL-3.0). The scenes are
linked into Ultralytics' layout (images/, labels/ with class ids as in the scenes' COCO file: 1-10,
class 0 "background" never labelled, so labels match torchvision's detectors), trained from scratch
with Ultralytics' own trainer (mosaic, its task-aligned assigner and DFL loss; nothing downloaded),
then the best weights are written as a relprop checkpoint (``arch``, ``num_classes``,
``input_size``, ``state_dict``: loadable with ``weights_only=True``) and its mAP@0.5 on the val
scenes is measured by pycocotools through relprop's letterbox and post-processing
(``relprop.detection.yolo``), as for the other detectors (train_detectors.py's ``map50``).

    python benchmarks/train_yolo.py /tmp/scenes --minutes 25 --out /tmp/yolov8n.pt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_detectors import Scenes, map50  # noqa: E402

from relprop.detection.builders import build_detector  # noqa: E402


def yolo_layout(scenes: Path, root: Path) -> Path:
    """Ultralytics' images/ + labels/ tree for the scenes (images linked), and its dataset YAML."""
    names = {0: "background"}
    for split in ("train", "val"):
        coco = json.loads((scenes / f"{split}.json").read_text())
        names |= {c["id"]: c["name"] for c in coco["categories"]}
        images, labels = root / "images" / split, root / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        objects: dict[int, list[dict]] = {}
        for ann in coco["annotations"]:
            objects.setdefault(ann["image_id"], []).append(ann)
        for meta in coco["images"]:
            source = (scenes / meta["file_name"]).resolve()
            link = images / source.name
            if not link.exists():
                link.symlink_to(source)
            w, h = meta["width"], meta["height"]
            rows = [f"{a['category_id']} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}"
                    for a in objects.get(meta["id"], []) for x, y, bw, bh in [a["bbox"]]]
            (labels / f"{source.stem}.txt").write_text("\n".join(rows) + "\n")
    listed = "\n".join(f"  {k}: {v}" for k, v in sorted(names.items()))
    config = root / "scenes.yaml"
    config.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{listed}\n")
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenes", type=Path)
    parser.add_argument("--arch", default="yolov8n", help="an Ultralytics model YAML name (relprop builds yolov8n/s)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--minutes", type=float, default=25.0, help="training time budget")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/yolo_scenes"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="relprop checkpoint to write")
    args = parser.parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO  # deferred: the optional yolo extra
    from ultralytics.nn.tasks import load_checkpoint  # deferred: the optional yolo extra

    config = yolo_layout(args.scenes, args.workspace)
    started = time.time()
    trainer = YOLO(f"{args.arch}.yaml")
    trainer.train(data=str(config), imgsz=args.size, epochs=1000, time=args.minutes / 60, batch=args.batch,
                  device=args.device, workers=2, amp=False, plots=False, pretrained=False, seed=args.seed,
                  project=str(args.workspace / "runs"), name=args.arch, exist_ok=True, verbose=False)
    seconds = time.time() - started
    best = args.workspace / "runs" / args.arch / "weights" / "best.pt"
    trained, _ = load_checkpoint(str(best))  # this run's own file (Ultralytics pickles whole models)
    val = Scenes(args.scenes, "val")
    num_classes = len(val.categories) + 1
    model = build_detector(args.arch, num_classes, args.size)
    model.model.load_state_dict(trained.float().state_dict())
    scores = map50(model.eval(), val, torch.device("cpu"))
    print(f"{args.arch}: mAP@0.5 {scores['map50']:.3f}, mAP {scores['map']:.3f} after {seconds / 60:.1f} min "
          f"on {args.device}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"arch": args.arch, "num_classes": num_classes,
                "classes": ["__background__", *(c["wnid"] for c in val.categories)],
                "class_names": ["background", *(c["name"] for c in val.categories)], "input_size": args.size,
                "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                "map50": scores["map50"], "map": scores["map"], "train_seconds": round(seconds),
                "device": args.device, "command": " ".join(sys.argv)}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
