"""Planning table for `relprop evaluate`: images per second of every registered method and of both
insertion/deletion protocols, and the projected wall time of large evaluations.

    nice python benchmarks/bench_throughput.py --device cpu --images 4 --out bench_cpu.md
    python benchmarks/bench_throughput.py --device cuda --images 64 --out bench_gpu.md
    python benchmarks/bench_throughput.py --device cuda --images 32 --arch resnet50 --size 224 \\
        --out bench_gpu_r50.md        # the paper's ImageNet model and size (random weights)
    python benchmarks/bench_throughput.py --device cuda --images 64 --arch resnet50 --size 224 --synthetic \\
        --methods lrp-split,gradcam,scorecam,ig,gbp,lrp-captum    # no ../shared needed (a device machine)

Default model: ../shared/models/resnet18_tin10.pt on the first `--images` images of
../shared/data/tin10/val at 112 px (its preprocessing). With `--arch` other than resnet18 or
another `--size`, a torchvision model with random weights (speed does not depend on the weights)
on the same images resized to `--size`. `--synthetic`: that model with ImageNet's 1,000 classes
on random images and labels, nothing read from ../shared (for a machine without it). Each method
explains the images in batches of `--batch-size` as `relprop evaluate` does; each protocol scores
ready-made maps (Grad-CAM's) with `max(batch, 64)` frames per forward. Times are medians of `--repeats` runs after one warm-up.

The projections are arithmetic on the measured per-image times (labelled "projected"): the
paper's ImageNet protocol is 1,000 images x its 6 methods (ours, gradcam, scorecam, ig, gbp,
lrp-captum) under the paper protocol; 50,000 images on 8 GPUs assumes perfect scaling over
ranks (torchrun shards without communication). Only a run at the paper's model and size
(`--arch resnet50 --size 224`) projects ImageNet directly; at 112 px the frame count is 4x
smaller and the forwards cheaper, so those rows are a lower bound.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PAPER_METHODS = ("lrp-split", "gradcam", "scorecam", "ig", "gbp", "lrp-captum")
NOT_FOR_IMAGES = ("bow-lrp", "bow-occlusion")  # bag-of-words classifiers only


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--images", type=int, default=4, help="tin10 val images timed (default 4)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per attribute call")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, median reported")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--synthetic", action="store_true",
                        help="random images and labels, a random-weight --arch with 1,000 classes")
    parser.add_argument("--methods", help="comma list (default: every registered image method)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, help="write the markdown table here (also printed)")
    return parser.parse_args()


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def synthetic(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple, torch.Tensor, torch.Tensor, str]:
    """A random-weight ImageNet classifier on random images (throughput does not depend on either)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.arch, num_classes=1000).eval()
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    inputs = (torch.rand(args.images, 3, args.size, args.size) - mean) / std
    labels = torch.randint(0, 1000, (args.images,))
    source = f"{args.arch} (random weights, 1000 classes, random images)"
    return model.to(args.device), (IMAGENET_MEAN, IMAGENET_STD), inputs.to(args.device), labels.to(args.device), source


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple, torch.Tensor, torch.Tensor, str]:
    """The model, its normalization (mean, std), the preprocessed images and their labels, and a
    description."""
    import torchvision

    from relprop.data import discover, load_item
    from relprop.images import BoundedTransform
    from relprop.models import load_model, preprocessing

    if args.synthetic:
        return synthetic(args)

    model, info = load_model(SHARED / "models" / "resnet18_tin10.pt")
    source = "resnet18_tin10.pt"
    if args.arch != "resnet18" or args.size != info.preprocessing.resize:
        torch.manual_seed(0)
        model = torchvision.models.get_model(args.arch, num_classes=len(info.classes)).eval()
        info = replace(info, preprocessing=replace(info.preprocessing, resize=args.size))
        source = f"{args.arch} (random weights, {len(info.classes)} classes)"
    dataset = discover(SHARED / "data" / "tin10" / "val", info.classes, info.class_names)
    items = sorted(dataset.items, key=lambda it: it.path)[:: max(1, len(dataset.items) // args.images)]
    transform = BoundedTransform(preprocessing(info), info.preprocessing.resize)
    inputs = torch.stack([load_item(dataset.root, it, transform, info)[0] for it in items[:args.images]])
    labels = torch.tensor([it.label for it in items[:args.images]])
    return model.to(args.device), (info.mean, info.std), inputs.to(args.device), labels.to(args.device), source


def timed(run, repeats: int, device: str) -> float:
    """Median seconds of `run()` over `repeats` after one warm-up (synchronized on a GPU)."""
    def once() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()
    return statistics.median(once() for _ in range(repeats))


def attribute_all(method, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([method.attribute(x[i:i + batch]) for i in range(0, len(x), batch)])


def main() -> int:
    from relprop.defaults import MIN_FRAME_BATCH
    from relprop.evaluation.metrics import PROTOCOLS, insertion_deletion
    from relprop.methods import get_method, method_names

    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, (mean, std), x, labels, source = load(args)
    n = len(x)
    names = (args.methods.split(",") if args.methods else
             [m for m in method_names() if m not in NOT_FOR_IMAGES])
    per_image: dict[str, float] = {}
    rows = []
    maps = None
    for name in names:
        try:
            method = get_method(name, model, batch_size=args.batch_size, mean=mean, std=std)
            seconds = timed(lambda m=method: attribute_all(m, x, args.batch_size), args.repeats, args.device)
        except Exception as error:  # a method this model cannot run: say so, go on
            rows.append(f"| {name} | – | – | {type(error).__name__}: {str(error).splitlines()[0][:80]} |")
            continue
        per_image[name] = seconds / n
        rows.append(f"| {name} | {n / seconds:.2f} | {1000 * seconds / n:.1f} | measured |")
        print(rows[-1], file=sys.stderr)
    maps = get_method("gradcam", model, mean=mean, std=std).attribute(x)[:, 0].cpu()
    for protocol in PROTOCOLS:
        seconds = timed(lambda p=protocol: insertion_deletion(
            model, x, maps, labels, p, mean=mean, std=std,
            batch_size=max(args.batch_size, MIN_FRAME_BATCH)), args.repeats, args.device)
        per_image[f"protocol:{protocol}"] = seconds / n
        rows.append(f"| protocol `{protocol}` (insertion + deletion) | {n / seconds:.2f} | "
                    f"{1000 * seconds / n:.1f} | measured |")
        print(rows[-1], file=sys.stderr)
    text = report(args, source, n, rows, per_image)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


def report(args: argparse.Namespace, source: str, n: int, rows: list[str], per_image: dict[str, float]) -> str:
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda") else
              f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    images = "random images" if args.synthetic else "tin10 val images"
    lines = [f"Model {source} at {args.size} px on {device}; {n} {images}, batch "
             f"{args.batch_size}, median of {args.repeats}; torch {torch.__version__}.", "",
             "| Method / protocol | images/s | ms/image | |", "|---|---|---|---|", *rows, ""]
    paper = [m for m in PAPER_METHODS if m in per_image]
    if len(paper) == len(PAPER_METHODS) and "protocol:paper" in per_image:
        one = sum(per_image[m] + per_image["protocol:paper"] for m in paper)  # s per image, 6 methods
        lines += ["| Evaluation | wall time | |", "|---|---|---|",
                  f"| paper's ImageNet protocol: 1,000 images x 6 methods, 1 device | "
                  f"{_duration(1000 * one)} | projected |",
                  f"| all 50,000 ImageNet val images x 6 methods, 8 devices (torchrun, ideal scaling) | "
                  f"{_duration(50000 * one / 8)} | projected |", ""]
    else:
        lines.append(f"(no projection: needs {', '.join(PAPER_METHODS)} and protocol paper)")
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days ({math.ceil(hours)} h)"


if __name__ == "__main__":
    sys.exit(main())
