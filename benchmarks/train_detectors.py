"""Train a detector on the tin10 scenes (benchmarks/make_scenes.py) and record its mAP@0.5.

Detectors: any of relprop.detection.architectures, e.g. ``ssd300_vgg16`` (torchvision's, 300 px),
``ssd_resnet18``, ``retinanet_resnet18_fpn`` and ``fcos_resnet18_fpn`` (relprop's light ones). No weights are downloaded; ``--backbone`` may
start the ResNet-18 from a tin10 classifier checkpoint (../shared/models/resnet18_tin10.pt: the
same classes, so the backbone already knows them). BatchNorm is frozen (eval mode) when the backbone
is pretrained. Training stops after ``--epochs`` or ``--minutes``, whichever comes first; mAP@0.5
on the val scenes comes from pycocotools' COCOeval. Runs on CUDA when there is one (``--device``).

    python benchmarks/train_detectors.py /tmp/scenes --arch fcos_resnet18_fpn \
        --backbone ../shared/models/resnet18_tin10.pt --minutes 12 --out /tmp/fcos.pt
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.functional import hflip, to_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from relprop.detection.builders import DETECTORS, build_detector  # noqa: E402


class Scenes(torch.utils.data.Dataset):
    """A make_scenes split: (image (3, H, W) in [0, 1], {"boxes" (x0, y0, x1, y1), "labels"})."""

    def __init__(self, root: Path, split: str, flip: bool = False) -> None:
        self.root = root
        coco = json.loads((root / f"{split}.json").read_text())
        self.images = coco["images"]
        self.categories = coco["categories"]
        self.objects: dict[int, list[dict]] = {}
        for ann in coco["annotations"]:
            self.objects.setdefault(ann["image_id"], []).append(ann)
        self.flip = flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        meta = self.images[i]
        image = to_tensor(Image.open(self.root / meta["file_name"]).convert("RGB"))
        anns = self.objects.get(meta["id"], [])
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=torch.float32).view(-1, 4)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        if self.flip and torch.rand(()) < 0.5:
            image = hflip(image)
            boxes = torch.stack([meta["width"] - boxes[:, 2], boxes[:, 1], meta["width"] - boxes[:, 0],
                                 boxes[:, 3]], 1)
        return image, {"boxes": boxes, "labels": labels}


def pretrained_resnet18(path: Path) -> torch.nn.Module:
    """torchvision resnet18 with a tin10 classifier checkpoint's weights (its fc is dropped)."""
    import torchvision

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    resnet = torchvision.models.resnet18(weights=None)
    state = {k: v.float() for k, v in checkpoint["state_dict"].items() if not k.startswith("fc.")}
    missing, _ = resnet.load_state_dict(state, strict=False)
    assert all(k.startswith("fc.") for k in missing), missing
    return resnet


def freeze_batchnorm(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


@torch.no_grad()
def map50(model: torch.nn.Module, data: Scenes, device: torch.device) -> dict[str, float]:
    """COCO mAP@0.5 and mAP@[.5:.95] of ``model`` on ``data`` (pycocotools)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    model.eval()
    results = []
    for i in range(len(data)):
        image, _ = data[i]
        (det,) = model([image.to(device)])
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(),
                                     strict=True):
            results.append({"image_id": data.images[i]["id"], "category_id": label, "score": score,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    if not results:
        return {"map50": 0.0, "map": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(data.root / "val.json"))
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"map50": float(evaluation.stats[1]), "map": float(evaluation.stats[0])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenes", type=Path)
    parser.add_argument("--arch", choices=DETECTORS, required=True)
    parser.add_argument("--backbone", type=Path, help="tin10 resnet18 checkpoint for the ResNet-18")
    parser.add_argument("--size", type=int, default=256, help="input size (relprop's light detectors and torchvision's FPN ones)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=12.0, help="training time budget")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train, val = Scenes(args.scenes, "train", flip=True), Scenes(args.scenes, "val")
    num_classes = len(train.categories) + 1
    resnet = pretrained_resnet18(args.backbone) if args.backbone else None
    model = build_detector(args.arch, num_classes, args.size, resnet).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch, shuffle=True,
                                         collate_fn=lambda batch: tuple(zip(*batch, strict=True)))
    started, step, epoch = time.time(), 0, 0
    budget = args.minutes * 60
    while epoch < args.epochs and time.time() - started < budget:
        model.train()
        if resnet is not None:
            freeze_batchnorm(model.backbone)
        for images, targets in loader:
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            losses = model(images, targets)
            loss = sum(losses.values())
            warmup = min(1.0, (step + 1) / 100)
            for group in optimizer.param_groups:
                group["lr"] = args.lr * warmup
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            step += 1
            if step % 25 == 0:
                print(f"epoch {epoch} step {step} loss {loss.item():.3f} "
                      f"{time.time() - started:.0f}s", flush=True)
            if time.time() - started > budget:
                break
        epoch += 1
    seconds = time.time() - started
    scores = map50(model, val, device)
    print(f"{args.arch}: mAP@0.5 {scores['map50']:.3f}, mAP {scores['map']:.3f} after {epoch} epoch(s), "
          f"{step} steps, {seconds / 60:.1f} min on {device}", flush=True)
    classes = ["__background__", *(c["wnid"] for c in train.categories)]
    names = ["background", *(c["name"] for c in train.categories)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"arch": args.arch, "num_classes": num_classes, "classes": classes, "class_names": names,
                "input_size": int(model.transform.min_size[0]),  # SSDs keep their own (300, 320)
                "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                "map50": scores["map50"], "map": scores["map"], "epochs": epoch, "steps": step,
                "train_seconds": round(seconds), "device": str(device),
                "command": " ".join(sys.argv)}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
