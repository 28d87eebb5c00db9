"""Insertion/deletion time per image against the bare cost of its forwards.

    python benchmarks/bench_insdel.py --images 8 --batch 64 --protocol paper rise --threads 1

The bare cost is the model's forward over the same number of frames (random inputs, the same
batch size), so the ratio is the overhead of making frames, ranking maps and scoring (goal:
within 1.3x). Model: ../shared/models/resnet18_tin10.pt at 112 px, or a random `--arch`.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from benchsetup import add_model_arguments, setup_model

from relprop.evaluation.metrics import PAPER_STEP, insertion_deletion

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def frames_per_image(protocol: str, size: int) -> int:
    if protocol == "paper":
        return 2 * math.ceil(size * size / PAPER_STEP)
    return 2 * (math.ceil(size * size / size) + 1)


def interleaved_min(fns, device: str, repeats: int) -> list[float]:
    """Best of `repeats` runs of each function, run in turn so that load from other jobs on a
    shared machine hits them alike (the minimum is the least disturbed run)."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def bare_forwards(model: torch.nn.Module, count: int, size: int, batch: int, device: str) -> None:
    frames = torch.randn(min(batch, count), 3, size, size, device=device)
    with torch.no_grad():
        for start in range(0, count, batch):
            model(frames[: min(batch, count - start)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--protocol", nargs="+", default=["paper", "rise"])
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, source, x = setup_model(args)
    maps = torch.randn(args.images, args.size, args.size)
    labels = list(range(args.images))
    print(f"Insertion+deletion, {source}, {args.images} images at {args.size} px, batch {args.batch}, "
          f"device {args.device}, threads {torch.get_num_threads()}")
    print("| protocol | frames / image | s / image | bare forwards s / image | ratio |\n|---|---|---|---|---|")
    for protocol in args.protocol:
        count = frames_per_image(protocol, args.size)
        metric, bare = interleaved_min([
            lambda p=protocol: insertion_deletion(model, x, maps, labels, p, mean=MEAN, std=STD,
                                                  batch_size=args.batch),
            lambda c=count: bare_forwards(model, c * args.images, args.size, args.batch, args.device),
        ], args.device, args.repeats)
        print(f"| {protocol} | {count} | {metric / args.images:.3f} | {bare / args.images:.3f} | "
              f"{metric / bare:.2f} |")


if __name__ == "__main__":
    main()
