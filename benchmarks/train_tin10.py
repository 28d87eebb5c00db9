"""Train a small modern classifier (default: timm `convnext_atto`) on tin10, as a relprop checkpoint.

    python benchmarks/train_tin10.py --device cuda --epochs 60 --out convnext_atto_tin10.pt
    python benchmarks/train_tin10.py --device cpu --epochs 1 --limit 200 --out /tmp/check.pt  # smoke run

Same convention as ../shared/models/resnet18_tin10.pt (see ../shared/models/README.md): the 64×64
tin10 images are upscaled to `--size` (112) px with no crop and ImageNet mean/std, so
`relprop explain --weights OUT` and `relprop evaluate --weights OUT` load it as they load the
ResNet-18. The checkpoint is the shared format (`arch`, `num_classes`, `classes`, `class_names`,
`input_size`, `resize`, `crop`, `mean`, `std`, `val_acc`, fp32 `state_dict`); a timm architecture
is stored as `timm/<name>` so that relprop never builds torchvision's model of the same name.

Why it is fast on a GPU: all images are decoded once and kept on the device as one uint8 tensor
(5,000 × 3 × 64 × 64 is 61 MB), so there is no data loader and no worker process; the
augmentation (random resized crop 0.35–1 and horizontal flip as one per-image affine resampling,
then brightness/contrast/saturation jitter) runs batched on the device; bf16 autocast and
channels_last on CUDA; `--compile` adds torch.compile. Training: AdamW, linear warm-up then
cosine decay, label smoothing 0.1, seeded. The val accuracy is measured on all tin10 val images
(or `--limit` of them) with the checkpoint's own preprocessing (`relprop.models.preprocessing`,
PIL Resize), i.e. exactly what relprop evaluates. The reported model is the last epoch's (no
selection on val). A `OUT.resume.pt` is written after every epoch; `--resume` continues from it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from relprop.defaults import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from relprop.images import load_image  # noqa: E402
from relprop.models import Preprocessing, preprocessing  # noqa: E402

SHARED = ROOT.parent / "shared"
SOURCE_SIZE = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "tin10",
                        help="tin10 root with train/ and val/ class folders and classes.tsv")
    parser.add_argument("--arch", default="convnext_atto",
                        help="timm model name (or timm/NAME, or a torchvision name with --library "
                             "torchvision)")
    parser.add_argument("--library", choices=("timm", "torchvision"), default="timm")
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help='JSON keyword arguments for timm.create_model, stored in the checkpoint '
                             'as `model_kwargs` (e.g. \'{"img_size": 64, "patch_size": 8}\' for a ViT)')
    parser.add_argument("--size", type=int, default=112, help="input side in px (images are 64 px)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=3, help="warm-up epochs")
    parser.add_argument("--drop-path", type=float, default=0.1, help="timm stochastic depth rate")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    parser.add_argument("--limit", type=int, help="use only this many train and val images (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=8, help="image decoding threads")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (.pt)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT.resume.pt")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- data


def class_list(root: Path) -> tuple[list[str], list[str]]:
    """wnids in sorted order (the ResNet-18's order) and their first WordNet name."""
    wnids = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    names = {}
    table = root / "classes.tsv"
    if table.is_file():
        for line in table.read_text().splitlines():
            wnid, _, lemmas = line.partition("\t")
            names[wnid] = lemmas.split(",")[0].strip()
    return wnids, [names.get(w, w) for w in wnids]


def image_files(split: Path, wnids: list[str], limit: int | None, seed: int) -> list[tuple[Path, int]]:
    files = [(f, k) for k, w in enumerate(wnids)
             for f in sorted((split / w).iterdir()) if f.suffix.lower() in (".jpeg", ".jpg", ".png")]
    if limit is not None and limit < len(files):
        random.Random(seed).shuffle(files)  # a seeded sample with every class in it
        files = sorted(files[:limit], key=lambda item: (item[1], item[0].name))
    return files


def load_split(files: list[tuple[Path, int]], transform, threads: int, desc: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image once (threads), stack; unreadable files are skipped with a warning."""
    def read(item):
        try:
            return transform(load_image(item[0])), item[1]
        except Exception as error:  # keep going past a bad file
            tqdm.write(f"skipped {item[0]}: {error}")
            return None

    with ThreadPoolExecutor(threads) as pool:
        done = [r for r in tqdm(pool.map(read, files), total=len(files), desc=desc) if r is not None]
    return torch.stack([x for x, _ in done]), torch.tensor([y for _, y in done])


def to_uint8(image) -> torch.Tensor:
    """PIL -> uint8 CHW at tin10's 64 px (augmentation resamples it on the device)."""
    import numpy as np

    if image.size != (SOURCE_SIZE, SOURCE_SIZE):  # tin10 is all 64 px; a stray size still stacks
        image = image.resize((SOURCE_SIZE, SOURCE_SIZE))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


# ---------------------------------------------------------------- augmentation on the device


def random_resized_flip(images: torch.Tensor, size: int, generator: torch.Generator,
                        scale: tuple[float, float] = (0.35, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Per-image RandomResizedCrop(size, scale, ratio) + horizontal flip as one bilinear resampling.

    `images` is float B×C×H×W; a crop of area fraction s and aspect r is the affine map that sends
    the output grid [-1, 1]² onto the crop box (sign of the x scale = the flip).
    """
    b, device = images.shape[0], images.device
    uniform = torch.rand(b, 4, generator=generator, device=device)
    area = scale[0] + (scale[1] - scale[0]) * uniform[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * uniform[:, 1]
    aspect = log_r.exp()
    w = (area * aspect).sqrt().clamp(max=1.0)  # crop width and height as fractions of the image
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (uniform[:, 2] * 2 - 1) * (1 - w)  # crop centre, in [-1, 1] coordinates, box inside
    cy = (uniform[:, 3] * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=generator, device=device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(images: torch.Tensor, generator: torch.Generator, strength: float = 0.3
                 ) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [1 - strength, 1 + strength] per image."""
    b = images.shape[0]
    f = 1 + strength * (2 * torch.rand(b, 3, 1, 1, 1, generator=generator,
                                       device=images.device) - 1)
    images = images * f[:, 0]
    gray = (images * torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
            ).sum(1, keepdim=True)
    images = (images - gray.mean((2, 3), keepdim=True)) * f[:, 1] + gray.mean((2, 3), keepdim=True)
    gray = (images * torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
            ).sum(1, keepdim=True)
    return ((images - gray) * f[:, 2] + gray).clamp(0, 1)


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


# ---------------------------------------------------------------- model and loop


def build_model(args: argparse.Namespace, num_classes: int) -> tuple[nn.Module, str]:
    """The model and the `arch` the checkpoint stores (`timm/NAME` for timm models)."""
    name = args.arch.removeprefix("timm/")
    if args.library == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, num_classes=num_classes), name
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes,
                             drop_path_rate=args.drop_path, **args.model_kwargs), f"timm/{name}"


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(x), 256):
        batch = x[start:start + 256].to(args.device, non_blocking=True)
        with autocast(args.device):
            logits = model(batch.contiguous(memory_format=memory_format(args.device)))
        correct += int((logits.argmax(1).cpu() == y[start:start + 256]).sum())
    return correct / len(x)


def autocast(device: str):
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def memory_format(device: str) -> torch.memory_format:
    return torch.channels_last if device.startswith("cuda") else torch.contiguous_format


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (args.data / "train").is_dir() or not (args.data / "val").is_dir():
        raise SystemExit(f"train_tin10: --data {args.data}: expected train/ and val/ class folders")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("train_tin10: --device cuda but torch sees no GPU; use --device cpu")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    args.out.parent.mkdir(parents=True, exist_ok=True)
    wnids, names = class_list(args.data)
    meta = {"num_classes": len(wnids), "classes": wnids, "class_names": names,
            "input_size": args.size, "resize": args.size, "crop": None,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    if args.model_kwargs:  # relprop.load_model passes them to timm.create_model
        if args.library != "timm":
            raise SystemExit("train_tin10: --model-kwargs is for timm architectures")
        meta["model_kwargs"] = dict(args.model_kwargs)
    train_x, train_y = load_split(image_files(args.data / "train", wnids, args.limit, args.seed),
                                  to_uint8, args.threads, "decode train")
    val_x, val_y = load_split(image_files(args.data / "val", wnids, args.limit, args.seed),
                              preprocessing(Preprocessing.from_dict(meta)), args.threads, "decode val")
    train_x, train_y = train_x.to(args.device), train_y.to(args.device)

    model, arch = build_model(args, len(wnids))
    model = model.to(args.device, memory_format=memory_format(args.device))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                                  fused=args.device.startswith("cuda"))
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    steps_per_epoch = math.ceil(len(train_x) / args.batch)
    total = args.epochs * steps_per_epoch
    log: list[dict] = []
    start_epoch = 0
    resume_path = args.out.with_suffix(".resume.pt")
    if args.resume and resume_path.is_file():
        state = torch.load(resume_path, map_location=args.device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, log = int(state["epoch"]) + 1, json.loads(state["log"])
        torch.set_rng_state(state["rng"])
        print(f"train_tin10: resumed after epoch {start_epoch - 1} from {resume_path}")
    generator = torch.Generator(device=args.device).manual_seed(args.seed + start_epoch)
    forward = torch.compile(model) if args.compile else model

    print(f"train_tin10: {arch}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{len(train_x)} train / {len(val_x)} val images at {args.size} px on {args.device}, "
          f"torch {torch.__version__}")
    began = time.perf_counter() - (log[-1]["seconds"] if log else 0.0)
    for epoch in range(start_epoch, args.epochs):
        model.train()
        order = torch.randperm(len(train_x), device=args.device, generator=generator)
        loss_sum, correct = torch.zeros((), device=args.device), torch.zeros((), device=args.device)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for i in bar:
            lr = lr_at(epoch * steps_per_epoch + i, total, args.warmup * steps_per_epoch, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = order[i * args.batch:(i + 1) * args.batch]
            x = random_resized_flip(train_x[index].float() / 255, args.size, generator)
            x = normalize(color_jitter(x, generator)).contiguous(
                memory_format=memory_format(args.device))
            y = train_y[index]
            with autocast(args.device):
                logits = forward(x)
                loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
        val_acc = accuracy(model, val_x, val_y, args)
        row = {"epoch": epoch, "loss": float(loss_sum) / len(train_x),
               "train_acc": float(correct) / len(train_x), "val_acc": val_acc,
               "lr": lr, "seconds": time.perf_counter() - began}
        log.append(row)
        tqdm.write(json.dumps(row))
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "epoch": epoch, "log": json.dumps(log), "rng": torch.get_rng_state()},
                   resume_path)

    checkpoint = {
        "arch": arch, **meta, "val_acc": log[-1]["val_acc"], "epoch": log[-1]["epoch"],
        "note": (f"{arch} trained from scratch on tin10 train ({len(train_x)} images) at {args.size} "
                 f"px, {args.epochs} epochs, AdamW lr {args.lr} cosine, label smoothing 0.1, "
                 f"RandomResizedCrop(0.35-1) + flip + colour jitter; val_acc on {len(val_x)} tin10 "
                 f"val images; benchmarks/train_tin10.py, torch {torch.__version__}"),
        "state_dict": {k: v.detach().float().cpu() for k, v in model.state_dict().items()},
    }
    torch.save(checkpoint, args.out)
    log_path = args.out.with_suffix(".train_log.json")
    log_path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "arch": arch, "epochs": log}, indent=1))
    resume_path.unlink(missing_ok=True)
    print(f"train_tin10: val accuracy {log[-1]['val_acc']:.3f} on {len(val_x)} tin10 val images; "
          f"wrote {args.out} and {log_path} ({log[-1]['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
