"""The engine's fast paths on and off, in one process: the same explainer, the two settings
taking turns call by call, so that machine drift hits both alike (separate runs of a whole
benchmark drift by up to 30 % on a shared CPU; this sees changes of a few percent).

    python benchmarks/bench_switches.py --arch convnext_tiny vit_b_16 --switch scratch --calls 15
    python benchmarks/bench_switches.py --arch resnet50 --composite lrp-split --switch pointwise winners

Thread time, one thread, random weights, 224 px. Each switch turns one fast path off; the maps
are the same either way (bit for bit, or float rounding for `pointwise` and `patchwise`;
tests/test_engine_speed.py):
- scratch: the walk's scratch slots (ε's denominators, w⁺, w⁻, folded weights) become fresh tensors;
- negative-weight: w⁻ alone (z+ on signed inputs, αβ) is clamped into fresh memory;
- pointwise: 1×1 convs transpose by `conv_transpose2d` instead of one batched matrix product;
- patchwise: patch embeddings (windows that tile the input) likewise, instead of one GEMM and a reshuffle;
- routes: reshapes, permutes and axis swaps send relevance back by autograd's vjp instead of directly;
- winners: winner-takes-all max pools re-run the pool (autograd) instead of using the forward's argmax;
- relu-in-place: the recording forward writes every ReLU to a fresh tensor instead of into a dying input.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from bench_lrp import build

from relprop import LRP, get_composite
from relprop.core import linear_op, rules
from relprop.core.interpreter import RelevanceEngine
from relprop.core.numerics import DENOMINATOR, NEGATIVE_WEIGHT
from relprop.core.ops import linear, maxpool, route


@contextmanager
def patched(module: object, name: str, value: object) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextmanager
def no_scratch() -> Iterator[None]:
    with patched(rules, "scratch_like", lambda z, slot=None: None), \
            patched(linear, "scratch_like", lambda z, slot=None: None):
        yield


def fresh_negative_weights() -> AbstractContextManager[None]:
    original = rules.scratch_like
    return patched(rules, "scratch_like", lambda z, slot=DENOMINATOR: None if slot == NEGATIVE_WEIGHT else original(z, slot))


SWITCHES: dict[str, Callable[[], object]] = {
    "scratch": no_scratch,
    "negative-weight": fresh_negative_weights,
    "pointwise": lambda: patched(linear_op, "_POINTWISE_MIN_POSITIONS", float("inf")),
    "patchwise": lambda: patched(linear_op, "_PATCHWISE_MIN_AREA", float("inf")),
    "routes": lambda: patched(route, "_moved_back", lambda *args: None),
    "winners": lambda: patched(maxpool, "_keeps_winners", lambda step, context: False),
    "relu-in-place": lambda: patched(RelevanceEngine, "_hands_over", lambda self, step, dying: False),
}


def compare(arch: str, composite: str, switch: str, calls: int, batch: int) -> tuple[float, float]:
    model = build(arch, "cpu")
    x = torch.randn(batch, 3, 224, 224)
    explainer = LRP(model, composite=get_composite(composite))
    explainer.attribute(x)
    on: list[float] = []
    off: list[float] = []
    for _ in range(calls):
        start = time.thread_time()
        explainer.attribute(x)
        on.append(time.thread_time() - start)
        with SWITCHES[switch]():
            start = time.thread_time()
            explainer.attribute(x)
            off.append(time.thread_time() - start)
    return statistics.median(on), statistics.median(off)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["convnext_tiny", "vit_b_16"])
    parser.add_argument("--composite", default="cp-lrp")
    parser.add_argument("--switch", nargs="+", default=["scratch"], choices=list(SWITCHES))
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"# {args.composite}, batch {args.batch}, medians of {args.calls} calls each, taking turns")
    print("| model | fast path | on (ms) | off (ms) | off / on |\n|---|---|---|---|---|")
    for arch in args.arch:
        for switch in args.switch:
            on, off = compare(arch, args.composite, switch, args.calls, args.batch)
            print(f"| {arch} | {switch} | {on * 1e3:.1f} | {off * 1e3:.1f} | {off / on:.3f} |")


if __name__ == "__main__":
    main()
