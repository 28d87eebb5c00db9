"""LRP against the input gradient and a peer, phase by phase: the model's forward and autograd's
backward against relprop's recording forward and its walk, in one process, taking turns.

    python benchmarks/bench_phases.py --arch vit_b_16 --composite cp-lrp --peer lxt --repeats 5

Thread time (`time.thread_time`, one thread), random weights (seed 0), one image at 224 px.
`bench_lrp.py` times whole calls; this splits them, to say which half a difference is in.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from bench_lrp import build
from peers import peer

from relprop import LRP, get_composite


def clocked(function: Callable[..., object], *args: object) -> tuple[float, object]:
    start = time.thread_time()
    result = function(*args)
    return time.thread_time() - start, result


def phases(arch: str, composite: str, peer_name: str | None, repeats: int, size: int) -> dict[str, float]:
    model = build(arch, "cpu")
    x = torch.randn(1, 3, size, size)
    explainer = LRP(model, composite=get_composite(composite))
    explainer.attribute(x)  # the fidelity check runs once per shape: not timed
    engine = explainer.engine
    other = peer(peer_name, model).run if peer_name else None
    if other is not None:
        other(x)
    times: dict[str, list[float]] = {}

    def note(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    for _ in range(repeats):
        with torch.no_grad():
            note("model forward (no grad)", clocked(lambda: model(x))[0])
        leaf = x.clone().requires_grad_()
        seconds, logits = clocked(model, leaf)
        note("model forward (grad)", seconds)
        note("autograd backward to the input", clocked(torch.autograd.grad, logits[0, 3], leaf)[0])
        seconds, record = clocked(lambda: engine.forward(x))
        note("relprop recording forward", seconds)
        seed = torch.zeros_like(record.output)
        seed[:, 3] = record.output[:, 3]
        note("relprop walk", clocked(engine.backward, record, seed)[0])
        note(f"relprop attribute ({composite})", clocked(lambda: explainer.attribute(x, target=3))[0])
        if other is not None:
            note(f"{peer_name} (whole call)", clocked(lambda: other(x))[0])
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_b_16")
    parser.add_argument("--composite", default="cp-lrp")
    parser.add_argument("--peer", default=None, help="lxt, zennit or captum (benchmarks/peers.py)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    result = phases(args.arch, args.composite, args.peer, args.repeats, args.size)
    print(f"# {args.arch} at {args.size} px, batch 1, one thread, thread time, medians of {args.repeats}")
    print("| phase | ms |\n|---|---|")
    for name, seconds in result.items():
        print(f"| {name} | {seconds * 1e3:.1f} |")


if __name__ == "__main__":
    main()
