"""The ε rule's scratch buffer on and off, in one process: the same explainer, the two taking
turns call by call, so machine drift hits both alike.

    python benchmarks/bench_scratch.py --arch convnext_tiny vit_b_16 --calls 15

Thread time, one thread, `cp-lrp`, batch 1, 224 px, random weights. Off means the rule asks for
no scratch (a fresh temporary per layer, as before the scratch existed); the numbers are the same
either way (tests/test_engine_speed.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_lrp import build

from relprop import LRP, get_composite
from relprop.core import numerics, rules


def compare(arch: str, calls: int) -> dict[str, float]:
    model = build(arch, "cpu")
    x = torch.randn(1, 3, 224, 224)
    explainer = LRP(model, composite=get_composite("cp-lrp"))
    explainer.attribute(x)
    times: dict[str, list[float]] = {"scratch": [], "fresh": []}
    try:
        for _ in range(calls):
            for name, provider in (("scratch", numerics.scratch_like), ("fresh", lambda z: None)):
                rules.scratch_like = provider
                start = time.thread_time()
                explainer.attribute(x)
                times[name].append(time.thread_time() - start)
    finally:
        rules.scratch_like = numerics.scratch_like
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["convnext_tiny", "vit_b_16"])
    parser.add_argument("--calls", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("| model | with the scratch (ms) | fresh temporaries (ms) |\n|---|---|---|")
    for arch in args.arch:
        result = compare(arch, args.calls)
        print(f"| {arch} | {result['scratch'] * 1e3:.1f} | {result['fresh'] * 1e3:.1f} |")


if __name__ == "__main__":
    main()
