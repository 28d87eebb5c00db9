"""Explain a subset of the model zoo with two relprop source trees and compare, model by model.

    git worktree add /tmp/relprop-before <commit>
    python benchmarks/zoo_parity.py --before /tmp/relprop-before/src --after src

For a change that must not change any result (a restructuring): every model gets the same verdict
(explained, with its conservation error, or refused with the same line) and bit-identical maps.
Each tree runs in its own process (the tree first on `sys.path`); random weights (seed 0), one
224 px input (seed 0), `LRP(model)` with its defaults. Models that no tree can build are listed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TORCHVISION = ["resnet18", "resnet50", "resnext50_32x4d", "vgg11_bn", "alexnet", "densenet121", "googlenet",
               "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "efficientnet_v2_s", "convnext_tiny",
               "regnet_x_400mf", "shufflenet_v2_x0_5", "squeezenet1_0", "mnasnet0_5", "vit_b_16", "swin_t",
               "swin_v2_t", "maxvit_t"]
TIMM = ["resnet18", "resnet10t", "convnext_atto", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
        "efficientnet_b0", "mobilenetv3_small_050", "regnetx_002", "levit_128s", "swin_tiny_patch4_window7_224",
        "resnetv2_50", "densenet121", "ghostnet_100", "mixer_s16_224", "poolformer_s12", "coat_tiny",
        "edgenext_xx_small", "mobilevit_xxs", "dla34", "cspresnet50"]

WORKER = """
import sys, warnings
sys.path.insert(0, {tree!r})
sys.path.insert(1, {benchmarks!r})
import json, torch
from relprop import LRP
from zoo_common import build_model, verdict
warnings.filterwarnings("ignore")
verdicts = {{}}
for source, name in {models!r}:
    key = f"{{source}}/{{name}}"
    torch.manual_seed(0)
    try:
        model = build_model(source, name).eval()
    except Exception as error:
        verdicts[key] = f"cannot build: {{type(error).__name__}}"
        continue
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    held = {{}}
    def run():
        held["R"], held["sums"] = LRP(model).attribute(x, return_layer_sums=True)
    outcome, detail = verdict(run)
    if outcome == "explained":
        sums = held["sums"]
        error = float(((sums["input"] - sums["output"]).abs() / sums["output"].abs()).max())
        torch.save(held["R"], {out!r} + f"/{{source}}-{{name}}.pt")
        verdicts[key] = f"explained, conservation error {{error:.1e}}"
    else:
        verdicts[key] = f"{{'refused' if outcome == 'refused' else 'CRASH'}}: {{detail}}"
    print(key, verdicts[key], file=sys.stderr, flush=True)
json.dump(verdicts, open({out!r} + "/verdicts.json", "w"), indent=1)
"""


def run_tree(tree: Path, models: list[tuple[str, str]], out: Path) -> dict[str, str]:
    out.mkdir(parents=True)
    code = WORKER.format(tree=str(tree.resolve()), benchmarks=str(Path(__file__).resolve().parent),
                         models=models, out=str(out))
    subprocess.run([sys.executable, "-c", code], check=True)
    return json.loads((out / "verdicts.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the src/ folder of the tree to compare with")
    parser.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[1] / "src")
    args = parser.parse_args()
    models = [("torchvision", name) for name in TORCHVISION] + [("timm", name) for name in TIMM]
    with tempfile.TemporaryDirectory() as scratch:
        before = run_tree(args.before, models, Path(scratch) / "before")
        after = run_tree(args.after, models, Path(scratch) / "after")
        print("| model | before | after | max |ΔR| / max |R| |")
        print("|---|---|---|---|")
        for source, name in models:
            key = f"{source}/{name}"
            gap = ""
            maps = [Path(scratch) / tree / f"{source}-{name}.pt" for tree in ("before", "after")]
            if all(path.exists() for path in maps):
                R_before, R_after = (torch.load(path, weights_only=True) for path in maps)
                gap = f"{float((R_after - R_before).abs().max() / R_before.abs().max()):.1e}"
            marker = "" if before[key] == after[key] else " **changed**"
            print(f"| {key}{marker} | {before[key]} | {after[key]} | {gap} |")
        same = sum(before[key] == after[key] for key in before)
        print(f"\n{same} of {len(models)} models: the same verdict before and after")


if __name__ == "__main__":
    main()
