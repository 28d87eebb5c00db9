"""Why no LRP beats the gradient methods in RISE's and ROAD's protocols: the signed LRP is gradient × input.

On a network of ReLUs, max pools and folded BatchNorms, LRP-0 (the z-rule everywhere, the signed
split at the adds) *is* gradient × input (tests/test_lrp0_gradient.py), and ε-LRP (`cp-lrp`'s
rules) tends to it as ε → 0; on LayerNorm/GELU/attention networks it is gradient × input of the
forward with the norms' std, the activations' gates and the attention weights held constant
(LXT's "efficient" mode). So the most faithful LRP in the protocols that reward signed,
first-order maps can only match gradient × input, unless a rule moves it away from the gradient;
the rules that do (z+, γ, w⁺, HQ) move it towards positive evidence and lose those protocols.

This script measures both halves of that argument on trained models:
- per image, the Pearson r of the signed ε-LRP map (`cp-lrp`) with gradient × input, and with
  Integrated Gradients (channel sums, as the protocols rank them);
- from finished `faithful_search.py --halves` runs (`--runs`), the paired ID difference
  ε-LRP − gradient × input and IG − gradient × input in each protocol (half A and B pooled where
  both ran), with bootstrap CIs.

    python benchmarks/signed_lrp_vs_gradient.py --weights ../shared/models/resnet18_tin10.pt \
        --per-class 2 --runs /work/models-tin10/fsr_resnet18
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from class_sensitivity import tin10_images  # noqa: E402
from faithful_search import paired, read_half, scores_by_method  # noqa: E402

from relprop import load_model  # noqa: E402
from relprop.evaluation.protocols import PROTOCOLS  # noqa: E402
from relprop.methods import get_method  # noqa: E402

SIGNED_LRP = "cp-lrp"
REFERENCES = ("gradxinput", "ig")
SIGNED_LRP_KEYS = ("cand-eps-signed", "cand-cp-signed")  # its name in faithful_search's runs


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def map_correlations(weights: Path, per_class: int) -> dict[str, list[float]]:
    model, info = load_model(weights)
    methods = {name: get_method(name, model, mean=info.mean, std=info.std)
               for name in (SIGNED_LRP, *REFERENCES)}
    r: dict[str, list[float]] = {"cp-lrp~gradxinput": [], "cp-lrp~ig": [], "gradxinput~ig": []}
    for _, x in tin10_images(info, None, per_class):
        x = x.unsqueeze(0)
        target = int(model(x).argmax())
        maps = {name: m.to_2d(m.attribute(x, target=target)) for name, m in methods.items()}
        r["cp-lrp~gradxinput"].append(pearson(maps[SIGNED_LRP], maps["gradxinput"]))
        r["cp-lrp~ig"].append(pearson(maps[SIGNED_LRP], maps["ig"]))
        r["gradxinput~ig"].append(pearson(maps["gradxinput"], maps["ig"]))
    return r


def paired_rows(run: Path) -> list[str]:
    """The signed LRP and IG against gradient x input in each protocol, both halves pooled."""
    halves = {half: read_half(run / half) for half in ("A", "B") if (run / half).is_dir()}
    rows = []
    for protocol in PROTOCOLS:
        scores: dict[str, dict[str, float]] = {}
        for half, records in halves.items():
            for method, table in scores_by_method(records, protocol).items():
                name = "signed-lrp" if method in SIGNED_LRP_KEYS else method
                scores.setdefault(name, {}).update({f"{half}:{image}": v for image, v in table.items()})
        base = scores.get("gradxinput", {})
        for method in ("signed-lrp", "ig"):
            other = scores.get(method, {})
            if not set(base) & set(other):
                continue
            c = paired(other, base)
            rows.append(f"| {run.name} | {protocol} | {method} − gradxinput | {c['n']} | "
                        f"{c['mean_diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}] |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, nargs="*", default=[])
    parser.add_argument("--per-class", type=int, default=2, help="tin10 val images per class")
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="finished faithful_search --halves folders")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.weights:
        print("| model | pair | n | median r | min r |\n|---|---|---|---|---|")
    for weights in args.weights:
        for pair, values in map_correlations(weights, args.per_class).items():
            print(f"| {weights.stem} | {pair} | {len(values)} | {np.median(values):.4f} | {min(values):.4f} |",
                  flush=True)
    if args.runs:
        print("\n| run | protocol | paired ID difference | n | mean [95 % CI] |\n|---|---|---|---|---|")
        for run in args.runs:
            print("\n".join(paired_rows(run)), flush=True)


if __name__ == "__main__":
    main()
