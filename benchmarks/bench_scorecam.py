"""Score-CAM batched (relprop) against the per-channel batch-1 loop of the reference code.

    python benchmarks/bench_scorecam.py --images 2 --batch 32 128 --device cpu --threads 1

Model: ../shared/models/resnet18_tin10.pt at 112 px (512 channels in layer4), or a random
torchvision `--arch` at `--size` when the shared folder is absent. Both produce the same maps
(max |difference| printed); times are medians over `--repeats` after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from benchsetup import add_model_arguments, setup_model

from relprop.methods import get_method


def loop_scorecam(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One masked forward per channel and image, as haofanwang's Score-CAM does."""
    kept = {}
    handle = model.layer4.register_forward_hook(lambda m, i, o: kept.setdefault("a", o))
    maps = []
    with torch.no_grad():
        logits = model(x)
        handle.remove()
        for n in range(x.shape[0]):
            cls, activation = int(logits[n].argmax()), kept["a"][n:n + 1]
            total = torch.zeros(1, 1, *x.shape[-2:], device=x.device)
            for k in range(activation.shape[1]):
                up = F.interpolate(activation[:, k:k + 1], size=x.shape[-2:], mode="bilinear",
                                   align_corners=False)
                if up.max() == up.min():
                    continue
                norm = (up - up.min()) / (up.max() - up.min())
                total += torch.softmax(model(x[n:n + 1] * norm), dim=1)[0, cls] * up
            total = F.relu(total)
            maps.append((total - total.min()) / (total.max() - total.min()))
    return torch.cat(maps)


def timed(fn, device: str, repeats: int) -> tuple[float, torch.Tensor]:
    result = fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    model, source, x = setup_model(args)
    print(f"Score-CAM, {source}, {args.images} images at {args.size} px, device {args.device}, "
          f"threads {torch.get_num_threads()}")
    base, reference = timed(lambda: loop_scorecam(model, x), args.device, args.repeats)
    print("| variant | s / image | speed-up | max abs diff vs loop |\n|---|---|---|---|")
    print(f"| per-channel loop, batch 1 | {base / args.images:.3f} | 1.0x | - |")
    for batch in args.batch:
        method = get_method("scorecam", model, batch_size=batch)
        seconds, maps = timed(lambda m=method: m.attribute(x), args.device, args.repeats)
        diff = float((maps - reference).abs().max())
        print(f"| batched, {batch} masks per forward | {seconds / args.images:.3f} | "
              f"{base / seconds:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
