"""Time two relprop source trees against each other in one run (a refactoring must not be slower).

    git worktree add /tmp/relprop-before <commit>
    python benchmarks/bench_versions.py --before /tmp/relprop-before/src --after src \\
        --arch resnet50 convnext_tiny vit_b_16 --size 224 --batch 1 --repeats 5

Each tree gets its own worker process (the tree first on `sys.path`), which builds the same model
(random weights, seed 0) and input and runs the methods of `bench_lrp.py` on request. The parent
asks the workers in turns, method by method, round by round, so load that comes and goes on a
shared machine hits both trees alike. Printed: medians, LRP / input gradient per tree, and
after / before per method.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORKER = """
import sys, time
sys.path[:0] = [{tree!r}, {here!r}]
import torch
import relprop
assert relprop.__file__.startswith({tree!r}), relprop.__file__
import bench_lrp
if {threads}:
    torch.set_num_threads({threads})
model = bench_lrp.build({arch!r}, "cpu")
x = torch.randn({batch}, 3, {size}, {size}, generator=torch.Generator().manual_seed(0))
runs = {{name: bench_lrp.method_runner(name, model) for name in {methods!r}}}
for run in runs.values():
    run(x)  # warm-up (and the engine's one-time tracing)
print("ready", flush=True)
for line in sys.stdin:
    start = time.perf_counter()
    runs[line.strip()](x)
    print(time.perf_counter() - start, flush=True)
"""


def start_worker(tree: Path, args: argparse.Namespace, arch: str) -> subprocess.Popen:
    code = WORKER.format(tree=str(tree.resolve()), here=str(HERE), threads=args.threads, arch=arch,
                         batch=args.batch, size=args.size, methods=args.methods)
    worker = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    if worker.stdout.readline().strip() != "ready":
        raise SystemExit(f"the worker for {tree} failed to start")
    return worker


def ask(worker: subprocess.Popen, method: str) -> float:
    worker.stdin.write(method + "\n")
    worker.stdin.flush()
    return float(worker.stdout.readline())


def bench_arch(args: argparse.Namespace, arch: str) -> None:
    trees = {"before": args.before, "after": args.after}
    workers = {label: start_worker(tree, args, arch) for label, tree in trees.items()}
    times = {(label, method): [] for label in trees for method in args.methods}
    for _ in range(args.repeats):
        for method in args.methods:
            for label, worker in workers.items():
                times[label, method].append(ask(worker, method))
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()
    medians = {key: statistics.median(values) for key, values in times.items()}
    print(f"# {arch} at {args.size} px, batch {args.batch}, cpu, medians of {args.repeats}")
    print("| method | before s | after s | after / before | before × input gradient | after × input gradient |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        before, after = medians["before", method], medians["after", method]
        ratios = [medians[label, method] / medians[label, "input-gradient"] for label in trees]
        print(f"| {method} | {before:.3f} | {after:.3f} | {after / before:.2f} | {ratios[0]:.2f} | {ratios[1]:.2f} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the src/ folder of the tree to compare with")
    parser.add_argument("--after", type=Path, default=HERE.parent / "src", help="the src/ folder under test")
    parser.add_argument("--arch", nargs="+", default=["resnet50"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--methods", nargs="+", default=["lrp", "input-gradient"])
    args = parser.parse_args()
    if "input-gradient" not in args.methods:
        parser.error("--methods must include input-gradient (the ratios' reference)")
    for arch in args.arch:
        bench_arch(args, arch)


if __name__ == "__main__":
    main()
