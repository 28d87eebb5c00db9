"""Where LRP's time over the input gradient goes, by category, per model and composite.

    python benchmarks/profile_lrp.py --threads 1 --rounds 3
    python benchmarks/profile_lrp.py --arch vit_b_16 --composite cp-lrp --rounds 5

torchvision models with random weights (seed 0; a head that starts at zero is redrawn), 224 px,
batch 1, CPU by default. Each round runs the input gradient (forward + `torch.autograd.grad` of the
explained logit) and then `LRP(model, composite=...).attribute(x)` split into its parts, taking
turns so that a shared machine's load hits both alike; the table gives medians over the rounds.

The parts, timed from outside the engine (nothing in the library changes):
- recording forward: `RelevanceEngine.forward` (every node's output kept);
- one row per op category: each op's `relevance` handler, wrapped in this process with a timer;
  linear layers are split by their rule (z+, ε, w⁺ at the input, ...);
- Python walk: the backward walk's time outside the handlers (fan-in sums, the loop itself);
- seed and rest: `attribute` minus the parts above (target, seed, the conservation totals);
- fidelity check: `verify` with its dependency audit, run on the first input of each shape only
  (shown apart, in ms, not part of the steady-state total).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from relprop import LRP, get_composite

ARCHS = ("vit_b_16", "convnext_tiny", "efficientnet_b0", "swin_t")
NORM_NAMES = ("norm", "layer_norm", "group_norm", "batch_norm")


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    for module in model.modules():  # torchvision's ViT starts its head at zero: every map would be 0
        if isinstance(module, nn.Linear) and not module.weight.any():
            nn.init.normal_(module.weight, std=0.02)
    return model


def input_gradient(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    logits = model(x)
    return torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), x)[0]


def category(engine, step) -> str:
    """The row a step's relevance handler is counted in."""
    name = step.op.name
    if name == "linear":
        rule = engine.rule_for(step).name
        label = {"zplus": "z+", "epsilon": "ε", "wplus": "w⁺", "flat": "flat"}.get(rule, rule)
        return f"{label} linear/conv" + (" (input layer)" if step.op.sees_the_input(step) else "")
    if name in ("attention", "softmax", "matmul"):
        return "attention (softmax, products)"
    if name == "passthrough":
        module = type(step.module).__name__.lower() if step.module is not None else ""
        target = getattr(step.node.target, "__name__", str(step.node.target)).lower()
        if any(key in module or key in target for key in NORM_NAMES):
            return "norms"
        return "elementwise: activations, dropout"
    if name in ("add", "scale", "addcmul"):
        return "elementwise: adds, products, scales"
    if name in ("pool", "maxpool"):
        return "pooling"
    return "routes, cat, shapes"


class Timers:
    """Per-category seconds of the ops' relevance handlers, for one LRP explainer."""

    def __init__(self, lrp: LRP) -> None:
        self.engine, self.seconds = lrp.engine, defaultdict(float)
        self._categories: dict = {}
        self._wrapped: dict[int, tuple[object, Callable]] = {}

    def wrap(self) -> None:
        """Wrap each op of the plan (shared op objects: once each) with a timer."""
        for step in self.engine.steps:
            op = step.op
            if id(op) in self._wrapped or not hasattr(op, "relevance"):
                continue
            original = op.relevance
            self._wrapped[id(op)] = (op, original)
            op.relevance = self._timed(original)

    def unwrap(self) -> None:
        for op, original in self._wrapped.values():
            op.relevance = original
        self._wrapped.clear()

    def _timed(self, original: Callable) -> Callable:
        def relevance(step, values, R, context):
            key = self._categories.get(step.node)
            if key is None:
                key = self._categories[step.node] = category(self.engine, step)
            start = time.perf_counter()
            out = list(original(step, values, R, context))  # handlers may yield lazily: time them whole
            self.seconds[key] += time.perf_counter() - start
            return out

        return relevance


def profile_once(lrp: LRP, timers: Timers, x: torch.Tensor) -> dict[str, float]:
    """One explanation with its parts timed: seconds by row."""
    engine = lrp.engine
    timers.seconds.clear()
    forward_seconds = 0.0
    backward_seconds = 0.0
    original_forward, original_backward = engine.forward, engine.backward

    def forward(inputs):
        nonlocal forward_seconds
        start = time.perf_counter()
        record = original_forward(inputs)
        forward_seconds += time.perf_counter() - start
        return record

    def backward(*args, **kwargs):
        nonlocal backward_seconds
        start = time.perf_counter()
        result = original_backward(*args, **kwargs)
        backward_seconds += time.perf_counter() - start
        return result

    engine.forward, engine.backward = forward, backward
    timers.wrap()
    try:
        start = time.perf_counter()
        lrp.attribute(x)
        total = time.perf_counter() - start
    finally:
        timers.unwrap()
        del engine.forward, engine.backward  # the class's methods again
    handlers = dict(timers.seconds)
    parts = {"recording forward": forward_seconds, **handlers,
             "Python walk (outside the handlers)": backward_seconds - sum(handlers.values()),
             "seed and rest": total - forward_seconds - backward_seconds}
    return {**parts, "total": total}


def fidelity_seconds(lrp: LRP, x: torch.Tensor) -> float:
    """The fidelity check (with the dependency audit) as the first call of a shape runs it."""
    record = lrp.engine.forward(x)
    start = time.perf_counter()
    lrp.engine.verify(x, record)
    return time.perf_counter() - start


def profile(arch: str, composite: str, rounds: int) -> tuple[dict[str, float], float, float]:
    model = build(arch)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    lrp = LRP(model, composite=get_composite(composite))
    lrp.attribute(x)  # warm-up: the first call of a shape checks fidelity (timed apart)
    input_gradient(model, x)
    runs: list[dict[str, float]] = []
    gradients: list[float] = []
    timers = Timers(lrp)
    for _ in range(rounds):
        start = time.perf_counter()
        input_gradient(model, x)
        gradients.append(time.perf_counter() - start)
        runs.append(profile_once(lrp, timers, x))
    keys = {key for run in runs for key in run}
    medians = {key: statistics.median(run.get(key, 0.0) for run in runs) for key in keys}
    return medians, statistics.median(gradients), fidelity_seconds(lrp, x)


ORDER = ("recording forward",)
TAIL = ("Python walk (outside the handlers)", "seed and rest")


def table(results: dict[str, tuple[dict[str, float], float, float]], rounds: int) -> str:
    """One markdown table: rows are the parts, columns the (model, composite) pairs, each cell
    ms and the share of LRP's time."""
    columns = list(results)
    handler_rows = sorted({key for medians, _, _ in results.values() for key in medians}
                          - {*ORDER, *TAIL, "total"})
    lines = ["| part | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]

    def cell(column: str, key: str) -> str:
        medians = results[column][0]
        if key not in medians:
            return "—"
        return f"{1000 * medians[key]:.0f} ms ({100 * medians[key] / medians['total']:.1f} %)"

    for key in (*ORDER, *handler_rows, *TAIL):
        lines.append(f"| {key} | " + " | ".join(cell(c, key) for c in columns) + " |")
    lines.append("| **LRP total** | " + " | ".join(f"{1000 * results[c][0]['total']:.0f} ms" for c in columns)
                 + " |")
    lines.append("| input gradient | " + " | ".join(f"{1000 * results[c][1]:.0f} ms" for c in columns) + " |")
    lines.append("| **× input gradient** | " + " | ".join(f"{results[c][0]['total'] / results[c][1]:.2f}"
                                                          for c in columns) + " |")
    lines.append("| over the gradient | " + " | ".join(
        f"{1000 * (results[c][0]['total'] - results[c][1]):.0f} ms" for c in columns) + " |")
    lines.append("| fidelity check, first call of a shape (apart) | " + " | ".join(
        f"{1000 * results[c][2]:.0f} ms" for c in columns) + " |")
    return "\n".join(lines) + f"\n\n(medians of {rounds} rounds; batch 1, 224 px, {torch.get_num_threads()} " \
                              f"thread(s), torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), help="torchvision model names")
    parser.add_argument("--composite", nargs="+", default=["lrp-split", "cp-lrp"],
                        help="registered composites (relprop.composite_names())")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for arch in args.arch:
        for composite in args.composite:
            results[f"{arch}, {composite}"] = profile(arch, composite, args.rounds)
            print(f"# done: {arch}, {composite}", flush=True)
    print(table(results, args.rounds))


if __name__ == "__main__":
    main()
