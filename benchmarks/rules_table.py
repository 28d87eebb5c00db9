"""Conservation per layer and agreement with Zennit for the standard composites, on the shared
tin10 ResNet-18 (a trained BatchNorm network) and real validation images.

    python benchmarks/rules_table.py --images 8

Prints two markdown tables (docs/rules.md quotes them): relevance totals at every reported cut
as a fraction of the explained probability (median over images), and the per-image Pearson r
of each composite against Zennit's with its ResNetCanonizer (conventions aligned as in
tests/test_batchnorm.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from relprop import LRP
from relprop.models import load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def composites(mean: list[float], std: list[float]) -> dict[str, dict]:
    return {
        "paper (ratio split, z+, w⁺ input, BN pass)": {},
        "EpsilonPlusFlat (signed, BN fold)": dict(
            split="signed", maxpool="wta", rules={nn.Conv2d: "zplus", nn.Linear: "epsilon"}, input_rule="flat"),
        "EpsilonGammaBox (signed, BN fold)": dict(
            split="signed", maxpool="wta", rules={nn.Conv2d: "gamma", nn.Linear: "epsilon"}, input_rule="zb",
            mean=mean, std=std),
        "EpsilonGammaBox, BN pass": dict(
            split="signed", maxpool="wta", rules={nn.Conv2d: "gamma", nn.Linear: "epsilon"}, input_rule="zb",
            mean=mean, std=std, bn="pass"),
        "alpha2beta1 (ratio split, BN fold)": dict(rules={nn.Conv2d: "alpha2beta1"}),
    }


def zennit_maps(model: nn.Module, x: torch.Tensor, info) -> dict[str, torch.Tensor]:
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
    from zennit.rules import ZPlus
    from zennit.torchvision import ResNetCanonizer
    from zennit.types import Convolution

    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    seed = torch.zeros_like(p)
    rows = torch.arange(len(x))
    seed[rows, p.argmax(1)] = p[rows, p.argmax(1)]
    found = {}
    for name, composite in {
        "EpsilonPlusFlat (signed, BN fold)": EpsilonPlusFlat(
            layer_map=[(Convolution, ZPlus(zero_params="bias"))], canonizers=[ResNetCanonizer()]),
        "EpsilonGammaBox (signed, BN fold)": EpsilonGammaBox(
            low=(0 - mean) / std, high=(1 - mean) / std, canonizers=[ResNetCanonizer()]),
    }.items():
        with Gradient(model, composite) as attributor:
            found[name] = attributor(x.clone().requires_grad_(True), seed)[1]
    found["EpsilonGammaBox, BN pass"] = found["EpsilonGammaBox (signed, BN fold)"]
    return found


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.sum(1).flatten(1), b.sum(1).flatten(1)
    return torch.stack([torch.corrcoef(torch.stack([u, v]))[0, 1] for u, v in zip(a, b, strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    model, info = load_model(SHARED / "models" / "resnet18_tin10.pt")
    steps = transforms.Compose([transforms.Resize(info.preprocessing.resize), transforms.ToTensor(),
                                transforms.Normalize(info.mean, info.std)])
    files = sorted((SHARED / "data" / "tin10" / "val").glob("*/*.JPEG"))
    files = files[:: max(1, len(files) // args.images)][: args.images]
    x = torch.stack([steps(Image.open(f).convert("RGB")) for f in files])
    zennit = zennit_maps(model, x, info)
    rows, columns = [], None
    for name, kwargs in composites(info.mean, info.std).items():
        R, sums = LRP(model, **kwargs).attribute(x, return_layer_sums=True)
        ratios = {k: float((v / sums["output"]).median()) for k, v in sums.items()}
        columns = columns or list(ratios)
        spread = float((R.abs().sum((1, 2, 3)) / R.sum((1, 2, 3)).abs()).median())
        r = pearson(R, zennit[name]) if name in zennit else None
        agreement = "—" if r is None else f"{float(r.min()):.4f} / {float(r.median()):.4f}"
        rows.append((name, ratios, spread, agreement))
    print(f"{len(files)} tin10 val images, ResNet-18 at {info.preprocessing.resize} px; totals / explained probability (median)\n")
    print("| composite | " + " | ".join(columns) + " | Σ|R|/|ΣR| |")
    print("|---|" + "---|" * (len(columns) + 1))
    for name, ratios, spread, _ in rows:
        print(f"| {name} | " + " | ".join(f"{ratios[c]:.3f}" for c in columns) + f" | {spread:.3g} |")
    print("\n| composite | Pearson r against Zennit (min / median over images) |\n|---|---|")
    for name, _, _, agreement in rows:
        print(f"| {name} | {agreement} |")


if __name__ == "__main__":
    main()
