"""Where LRP's time over the input gradient goes, per model: the engine's recording forward and
its backward walk by op kind, and the two ratios (LRP with the default composite and with LXT's
choices) against the input gradient, measured in one run, rounds interleaved, medians.

    python benchmarks/bench_engine.py --arch vit_b_16 convnext_tiny efficientnet_b0 swin_t --batch 1 --repeats 5

Random weights (seed 0), one thread unless `--threads`. The breakdown times each op's `relevance`
(wrapped for the run only; the model is not touched); its rows add up to the walk.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from relprop import LRP, Composite
from relprop.core.ops import all_ops
from relprop.models import build_arch

# LXT's choices (docs/rules.md, "Against LXT"): ε on linear layers, CP attention, LayerNorm's std
# held constant, the signed split, constants leak.
LXT_CHOICES = Composite(rules={nn.Linear: "epsilon", nn.Conv2d: "epsilon", nn.LayerNorm: "norm-epsilon"},
                        input_rule="epsilon", split="signed", attention="cp", constants="leak")


def input_gradient(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.clone().requires_grad_(True)
        logits = model(x)
        return torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), x)[0]
    return run


def interleaved(runs: dict[str, Callable], x: torch.Tensor, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def breakdown(explainer: LRP, x: torch.Tensor) -> dict[str, float]:
    """Seconds of one call: the recording forward, then each op kind's relevance."""
    seconds: dict[str, float] = defaultdict(float)
    engine = explainer.engine

    def timed(name: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start
        return wrapper

    ops = all_ops()
    for op in ops:
        op.relevance = timed(op.name, op.relevance)  # an instance attribute over the class's method
    forward = engine.forward
    engine.forward = timed("recording forward", forward)
    try:
        start = time.perf_counter()
        explainer.attribute(x)
        seconds["total"] = time.perf_counter() - start
    finally:
        del engine.forward
        for op in ops:
            del op.relevance
    return dict(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["vit_b_16"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.size} px, medians of {args.repeats}")
    print("| model | batch | gradient s | LRP default s (×) | LRP LXT's choices s (×) | "
          "breakdown of one LRP call with LXT's choices, % of the gradient |")
    print("|---|---|---|---|---|---|")
    for arch in args.arch:
        torch.manual_seed(0)
        model = build_arch(arch, 1000).eval()
        default, lxt = LRP(model), LRP(model, composite=LXT_CHOICES)
        for batch in args.batch:
            x = torch.randn(batch, 3, args.size, args.size)
            runs = {"gradient": input_gradient(model), "default": default.attribute, "lxt": lxt.attribute}
            for run in runs.values():
                run(x)  # warm-up, fidelity check
            medians = interleaved(runs, x, args.repeats)
            parts = breakdown(lxt, x)
            gradient = medians["gradient"]
            share = ", ".join(f"{name} {100 * s / gradient:.0f}" for name, s in
                              sorted(parts.items(), key=lambda item: -item[1]) if s / gradient >= 0.01)
            print(f"| {arch} | {batch} | {gradient:.3f} | {medians['default']:.3f} ({medians['default'] / gradient:.2f}) "
                  f"| {medians['lxt']:.3f} ({medians['lxt'] / gradient:.2f}) | {share} |", flush=True)


if __name__ == "__main__":
    main()
