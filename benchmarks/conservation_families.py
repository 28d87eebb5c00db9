"""Conservation per model family with relprop's defaults, and the transformer measurements of
docs/rules.md (per-layer totals, AttnLRP's leaks, ratio vs signed split).

    python benchmarks/conservation_families.py --size 64 --images 2            # the family table
    python benchmarks/conservation_families.py --transformers --images 8       # per-layer tables

Random seeded weights (no pretrained weights are available offline), 10 classes. The family
table gives, per model, the input total divided by the explained probability (min and max over
images and over every reported cut). Runs on the CPU; `--device cuda` for a GPU.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from relprop import LRP, Composite


def _torchvision(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return build


def families(size: int) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    """The 13 models of issue #12 and torchvision's video ResNets: builder and input shape."""
    image, video = (3, size, size), (3, 8, size, size)
    return {
        "mobilenet_v3_small": (_torchvision("mobilenet_v3_small"), image),
        "efficientnet_b0": (_torchvision("efficientnet_b0"), image),
        "convnext_tiny": (_torchvision("convnext_tiny"), image),
        "shufflenet_v2_x0_5": (_torchvision("shufflenet_v2_x0_5"), image),
        "regnet_y_400mf": (_torchvision("regnet_y_400mf"), image),
        "swin_t": (_torchvision("swin_t"), image),
        "vit_b_16": (_torchvision("vit_b_16", image_size=size), image),
        "timm:convnext_atto": (_timm("convnext_atto"), image),
        "timm:efficientnet_b0": (_timm("efficientnet_b0"), image),
        "timm:resnetv2_50": (_timm("resnetv2_50"), image),
        "timm:regnety_008": (_timm("regnety_008"), image),
        "timm:vit_tiny_patch16_224": (_timm("vit_tiny_patch16_224", img_size=size), image),
        "timm:deit_tiny_patch16_224": (_timm("deit_tiny_patch16_224", img_size=size), image),
        "r3d_18": (_torchvision("r3d_18"), video),
        "mc3_18": (_torchvision("mc3_18"), video),
        "r2plus1d_18": (_torchvision("r2plus1d_18"), video),
    }


def explain(model: nn.Module, x: torch.Tensor, **options) -> tuple[torch.Tensor, dict, torch.Tensor]:
    R, sums = LRP(model, **options).attribute(x, return_layer_sums=True)
    with torch.no_grad():
        probability = torch.softmax(model(x), 1).max(1).values
    return R, sums, probability


def family_table(size: int, images: int, device: str) -> None:
    print(f"| model | input shape | input / p (min–max over {images} images) | all cuts / p (min–max) | s |")
    print("|---|---|---|---|---|")
    for name, (build, shape) in families(size).items():
        torch.manual_seed(0)
        model = build().eval().to(device)
        x = torch.randn(images, *shape, device=device)
        start = time.perf_counter()
        try:
            R, sums, p = explain(model, x)
        except Exception as error:  # keep going: the table names what fails
            print(f"| {name} | {tuple(shape)} | error: {str(error).splitlines()[0][:120]} | | |")
            continue
        seconds = time.perf_counter() - start
        ratio = R.flatten(1).sum(1) / p
        cuts = torch.stack([total / p for total in sums.values()])
        print(f"| {name} | {tuple(shape)} | {ratio.min():.5f}–{ratio.max():.5f} | "
              f"{cuts.min():.5f}–{cuts.max():.5f} | {seconds:.1f} |")


def small_models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """The small ViT and Swin of tests/test_transformers.py (random weights, 32 and 40 px)."""
    import timm
    from torchvision.models.swin_transformer import SwinTransformer
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2,
                                                          num_heads=3, num_classes=10)
    torch.manual_seed(0)
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                           stochastic_depth_prob=0.2, num_classes=10)
    for module in swin.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.1)
    return {"small ViT (timm, 32 px, depth 2)": (vit.eval(), (3, 32, 32)),
            "small Swin (torchvision, 40 px, 2 stages)": (swin.eval(), (3, 40, 40))}


# AttnLRP as LXT applies it: ε on every linear layer and at the input, AttnLRP attention; with
# the signed split (what its ε-rule on an add amounts to) or the paper's ratio split
_EPSILON = {nn.Conv2d: "epsilon", nn.Linear: "epsilon"}
ATTNLRP = Composite(rules=_EPSILON, input_rule="epsilon", split="signed", attention="attnlrp")
ATTNLRP_SPLIT = Composite(rules=_EPSILON, input_rule="epsilon", attention="attnlrp")

SETTINGS: dict[str, dict] = {
    "default (ratio split, z+, CP attention)": {},
    "signed split (lrp-plain)": {"split": "signed"},
    "constants leak": {"constants": "leak"},
    "attnlrp (ε, signed, AttnLRP attention)": {"composite": ATTNLRP},
    "attnlrp-split (ε, ratio, AttnLRP attention)": {"composite": ATTNLRP_SPLIT},
    "z+, ratio, AttnLRP attention": {"composite": Composite(attention="attnlrp")},
}


def transformer_tables(images: int, device: str) -> None:
    for title, (model, shape) in small_models().items():
        model = model.to(device)
        torch.manual_seed(1)
        x = torch.randn(images, *shape, device=device)
        print(f"\n### {title}: relevance total at each reported cut / p (median over {images} images)\n")
        rows, maps = {}, {}
        for setting, options in SETTINGS.items():
            R, sums, p = explain(model, x, **options)
            maps[setting] = R.flatten(1)
            rows[setting] = {cut: float((total / p).median()) for cut, total in sums.items()}
        cuts = list(next(iter(rows.values())))
        print("| cut | " + " | ".join(SETTINGS) + " |")
        print("|---" * (len(SETTINGS) + 1) + "|")
        for cut in cuts:
            print(f"| {cut} | " + " | ".join(f"{rows[s].get(cut, float('nan')):.4f}" for s in SETTINGS) + " |")
        ratio, signed = maps["default (ratio split, z+, CP attention)"], maps["signed split (lrp-plain)"]
        r = torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(ratio, signed, strict=True)])
        print(f"\nratio vs signed split, per-image Pearson r of the input maps: median {r.median():.3f}, "
              f"min {r.min():.3f}, max {r.max():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--transformers", action="store_true", help="the per-layer tables instead")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    if args.transformers:
        transformer_tables(args.images, args.device)
    else:
        family_table(args.size, args.images, args.device)


if __name__ == "__main__":
    main()
