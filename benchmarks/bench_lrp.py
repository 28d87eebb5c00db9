"""Time `LRP(model).attribute` against the input gradient and full backpropagation.

    python benchmarks/bench_lrp.py --arch resnet50 --size 224 --batch 1 16 --repeats 5 --threads 1
    python benchmarks/bench_lrp.py --arch convnext_tiny vit_b_16 --batch 1 16 --device cuda
    python benchmarks/bench_lrp.py --arch vit_b_16 --batch 1 --threads 1 --no-memory \
        --methods input-gradient lrp cp-lrp lxt                  # a peer beside relprop's same rules
    python benchmarks/bench_lrp.py --arch resnet50 vit_b_16 --batch 1 4 --threads 1 --memory-only \
        --methods input-gradient lrp lrp-cached cp-lrp           # peak memory alone

Any torchvision classifier or timm model name (`timm/NAME` for timm's where both have one), random
weights (seed 0). A method that relprop cannot run on a network (e.g. LRP through attention before
relprop supports it) is reported as `unsupported` with relprop's one-line reason; the others run.

(a) input gradient: forward + `torch.autograd.grad` of the explained logit w.r.t. the input;
(b) full backprop: forward + `.backward()` of the explained logit with parameter gradients
(what the paper calls "backprop"). Any registered composite name (`cp-lrp`, `epsilon-plus-flat`)
is relprop with that composite; `lxt`, `zennit` and `captum` are the peer libraries
(benchmarks/peers.py), each with the Pearson r of its map against relprop's with the same rules
(the minimum over the batch's images; both seeded with the explained logit) and its total over the
explained logit (Captum's on a ResNet: 1e26, not LRP). Medians over `--repeats` rounds after one warm-up, the
methods taking turns within each round; each method's peak memory is measured in a fresh
subprocess (CUDA: max_memory_allocated; CPU: peak resident set size above the resident size
after loading the model and the input).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from peers import PEERS, SAME_RULES, PeerUnavailable, peer

from relprop import LRP, composite_names, get_composite
from relprop.errors import RelpropError
from relprop.models import build_arch

METHODS = ("lrp", "lrp-cached", "lrp-reference", "input-gradient", "backprop")


def build(arch: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_arch(arch, 1000).eval()
    for module in model.modules():  # torchvision's ViT starts its head at zero: every map would be 0
        if isinstance(module, torch.nn.Linear) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.02)
    return model.to(device)


def supported(names: list[str], model: torch.nn.Module, x: torch.Tensor
              ) -> tuple[dict[str, Callable], dict[str, str]]:
    """The methods that run on this network (one call each, also the warm-up), and why the
    others do not (relprop's one-line error)."""
    ok, reasons = {}, {}
    for name in names:
        try:
            run = method_runner(name, model)
            run(x)
            ok[name] = run
        except (RelpropError, PeerUnavailable) as error:
            reasons[name] = str(error).splitlines()[0]
    return ok, reasons


def method_runner(name: str, model: torch.nn.Module) -> Callable[[torch.Tensor], object]:
    if name == "lrp":
        lrp = LRP(model)
        return lambda x: lrp.attribute(x)
    if name == "lrp-cached":  # the default, keeping weight copies between calls: w⁺ (ZPlusRule(cache_weights=True))
        cached = LRP(model)      # and folded BatchNorms (engine.cache_weights)
        cached.engine.strategies.default_rule.cache_weights = cached.engine.cache_weights = True
        return lambda x: cached.attribute(x)
    if name == "lrp-reference":
        reference = LRP(model, preset="reference")
        return lambda x: reference.attribute(x)
    if name in PEERS:
        return peer(name, model).run
    if name in composite_names():
        named = LRP(model, composite=get_composite(name))
        return lambda x: named.attribute(x)
    if name == "input-gradient":
        def input_gradient(x: torch.Tensor) -> torch.Tensor:
            x = x.clone().requires_grad_(True)
            logits = model(x)
            explained = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
            return torch.autograd.grad(explained, x)[0]
        return input_gradient
    if name == "backprop":
        def backprop(x: torch.Tensor) -> None:
            model.zero_grad(set_to_none=True)
            logits = model(x)
            logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
        return backprop
    raise ValueError(name)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_methods(runs: dict[str, Callable], x: torch.Tensor, repeats: int, device: str,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per method; the methods take turns in every round, so a load that comes
    and goes on a shared machine hits them all alike and the ratios stay meaningful."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            start = clock()
            run(x)
            synchronize(device)
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory_child(args: argparse.Namespace, arch: str, name: str, batch: int) -> None:
    """Run one method once in this (fresh) process and print its peak memory in MiB."""
    model = build(arch, args.device)
    x = torch.randn(batch, 3, args.size, args.size, device=args.device)
    run = method_runner(name, model)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(x)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _proc_status_kib("VmRSS")
        _reset_peak_rss()
        run(x)
        peak = (_proc_status_kib("VmHWM") - base) * 1024
    print(json.dumps({"peak_mib": peak / 2**20}))


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> None:
    """Reset the kernel's high-water mark (VmHWM) to the current resident size."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_memory(args: argparse.Namespace, arch: str, name: str, batch: int) -> float:
    command = [sys.executable, __file__, "--arch", arch, "--size", str(args.size), "--device",
               args.device, "--threads", str(args.threads), "--memory-child", name, "--batch", str(batch)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["resnet50"],
                        help="torchvision or timm names (timm/NAME), each benchmarked in turn")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        choices=[*METHODS, *PEERS, *composite_names()])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the peak memory of each method (one fresh process each), and × the input gradient's")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: this thread's CPU time (with --threads 1 on the "
                             "CPU, what a loaded machine's other processes do not add to)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        parser.error("--clock cpu counts this thread's time: it needs --threads 1 on the CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        peak_memory_child(args, args.arch[0], args.memory_child, args.batch[0])
        return
    for arch in args.arch:
        (bench_memory if args.memory_only else bench_arch)(args, arch)


def bench_memory(args: argparse.Namespace, arch: str) -> None:
    """Peak memory of one call per method, each in a fresh process (the first call: the fidelity
    check included), against the input gradient's at the same batch."""
    print(f"# {arch} at {args.size} px on {args.device} ({args.threads or 'default'} threads), "
          f"torch {torch.__version__}: peak MiB of one call in a fresh process")
    print("| batch | method | peak MiB | × input gradient |")
    print("|---|---|---|---|")
    for batch in args.batch:
        peaks = {name: peak_memory(args, arch, name, batch) for name in args.methods}
        gradient = peaks.get("input-gradient")
        for name, peak in peaks.items():
            ratio = f"{peak / gradient:.2f}" if gradient else ""
            print(f"| {batch} | {name} | {peak:.0f} | {ratio} |", flush=True)


def bench_arch(args: argparse.Namespace, arch: str) -> None:
    model = build(arch, args.device)
    print(f"# {arch} at {args.size} px on {args.device} ({torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, medians of {args.repeats}, {args.clock} clock")
    print("| batch | method | median s | per image ms | × input gradient | × backprop | peak MiB "
          "| r vs relprop, same rules | Σ map / logit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in args.batch:
        x = torch.randn(batch, 3, args.size, args.size, device=args.device)
        runs, reasons = supported(args.methods, model, x)
        clock = time.thread_time if args.clock == "cpu" else time.perf_counter
        medians = time_methods(runs, x, args.repeats, args.device, clock)
        compared = agreement(model, x, list(runs))
        for name, median in medians.items():
            memory = "" if args.no_memory else f"{peak_memory(args, arch, name, batch):.0f}"
            vs_gradient = median / medians["input-gradient"] if "input-gradient" in medians else float("nan")
            vs_backprop = median / medians["backprop"] if "backprop" in medians else float("nan")
            print(f"| {batch} | {name} | {median:.3f} | {1000 * median / batch:.1f} | {vs_gradient:.2f} | "
                  f"{vs_backprop:.2f} | {memory} | {compared.get(name, ('', ''))[0]} | "
                  f"{compared.get(name, ('', ''))[1]} |", flush=True)
        for name, reason in reasons.items():
            print(f"| {batch} | {name} | unsupported: {reason} | | | | | | |", flush=True)


def agreement(model: torch.nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, tuple[str, str]]:
    """For each peer: the minimum Pearson r over images of its map against relprop's with the
    same rules, and its total over the explained logit; for relprop's named composites, their
    total. Both seeded with the explained logit (untimed)."""
    with torch.no_grad():
        logits = model(x)
    explained = logits.argmax(1, keepdim=True)
    logit = logits.gather(1, explained)[:, 0]
    seed = torch.zeros_like(logits).scatter(1, explained, logit[:, None])
    maps: dict[str, torch.Tensor] = {}
    found: dict[str, tuple[str, str]] = {}

    def relprop_map(composite: str) -> torch.Tensor:
        if composite not in maps:
            maps[composite] = LRP(model, composite=get_composite(composite)).attribute(x, target=seed).detach()
        return maps[composite]

    def total(R: torch.Tensor) -> str:
        return f"{statistics.median((R.flatten(1).sum(1) / logit).tolist()):.3g}"

    for name in names:
        if name in composite_names():
            found[name] = ("", total(relprop_map(name)))
        elif name in PEERS:
            try:
                theirs = peer(name, model).relevance(x, seed)
            except PeerUnavailable as error:
                found[name] = (f"— ({error})", "")
                continue
            ratio = float(total(theirs))
            if not 1e-3 < abs(ratio) < 1e3:  # e.g. Captum on a ResNet: no split at the adds
                found[name] = ("— (its totals are not LRP's)", f"{ratio:.3g}")
                continue
            ours = relprop_map(SAME_RULES[name])
            r = min(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
                    for a, b in zip(ours, theirs, strict=True))
            found[name] = (f"{r:.6f} ({SAME_RULES[name]})", f"{ratio:.3g}")
    return found

if __name__ == "__main__":
    main()
