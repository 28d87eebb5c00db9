"""Model-parameter randomization test (Adebayo et al. 2018) through Quantus' MPRT.

    nice python benchmarks/sanity_checks.py --limit 4 --out bench_out/sanity_checks.md      # CPU check
    python benchmarks/sanity_checks.py --limit 50 --device cuda --out bench_out/sanity_checks.md

Quantus re-initializes the shared tin10 ResNet-18's layers from the top down, cascading (fc, then
layer4's, ... down to conv1), and after each step compares the map of the randomized model with
the original map (Spearman rank correlation of the normalized absolute maps: Quantus' defaults).
A map that explains the model must change: its similarity should fall towards 0 as layers are
re-initialized. Maps are the 2-D channel sums (what the metrics rank), explaining the original
model's predicted class. The table gives the mean similarity after the classifier, after all of
layer4, after layer3 and after every layer has been re-initialized.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
METHODS = ["ours", "lrp-contrastive", "lrp-faithful", "gradcam", "gradient"]
# the last module of each stage in Quantus' top-down order: after it, that whole stage is random
STAGES = {"fc": "fc", "layer4": "layer4.0.conv1", "layer3": "layer3.0.conv1", "all": "conv1"}


def explainer(spec: str, mean, std):
    """Quantus' explain_func: the method (`name[:key=value,...]`) built on the (randomized) model
    it is given, 2-D maps."""
    from class_sensitivity import parse_spec

    from relprop.methods import get_method

    name, options = parse_spec(spec)

    def explain(model, inputs, targets, **_):
        method = get_method(name, model, mean=mean, std=std, **options)
        device = next(model.parameters()).device
        x = torch.as_tensor(inputs, dtype=torch.float32, device=device)
        maps = method.to_2d(method.attribute(x, target=torch.as_tensor(targets).long().tolist()))
        return maps[:, None].detach().cpu().numpy()

    return explain


def mprt(name: str, model, x: torch.Tensor, y: np.ndarray, mean, std, device: str) -> dict[str, list[float]]:
    """Quantus MPRT (top-down, cascading) of one method: {layer: per-image similarity}."""
    import quantus

    metric = quantus.MPRT(layer_order="top_down", seed=42, disable_warnings=True, display_progressbar=True)
    return metric(model=model, x_batch=x.numpy(), y_batch=y, a_batch=None, channel_first=True,
                  explain_func=explainer(name, mean, std), device=device, batch_size=len(x))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=METHODS, help="names or name:key=value,... specs")
    parser.add_argument("--limit", type=int, default=4, help="tin10 val images (spread over classes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench_out/sanity_checks.md"))
    args = parser.parse_args(argv)
    from class_sensitivity import tin10_images

    from relprop.models import load_model

    model, info = load_model(SHARED / "models" / "resnet18_tin10.pt")
    model = model.to(args.device)
    per_class = max(1, -(-args.limit // 10))
    x = torch.stack([image for _, image in tin10_images(info, None, per_class)][: args.limit])
    with torch.no_grad():
        y = model(x.to(args.device)).argmax(1).cpu().numpy()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    raw_file = args.out.with_suffix(".json")
    raw = json.loads(raw_file.read_text()) if raw_file.is_file() else {}
    for name in args.methods:
        if name not in raw:  # resumable per method
            scores = mprt(name, model, x, y, info.mean, info.std, args.device)
            raw[name] = {layer: [float(v) for v in values] for layer, values in scores.items()}
            raw_file.write_text(json.dumps(raw))
    lines = ["| method | images | original | " + " | ".join(f"{k} random" for k in STAGES) + " |",
             "|---|---|---|" + "---|" * len(STAGES)]
    for name in args.methods:
        scores = raw[name]
        cells = [f"{np.mean(scores[layer]):.3f}" for layer in STAGES.values()]
        lines.append(f"| {name} | {len(scores['original'])} | {np.mean(scores['original']):.3f} | "
                     + " | ".join(cells) + " |")
    text = "\n".join(lines)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
