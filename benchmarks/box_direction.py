"""Which box-map definition passes the direction check? Measured on a detector and the tin10 scenes.

For each explained detection and each box output, the map's most positive 10 % of pixels are
replaced by the image's mean colour (the output should go down), then its most negative 10 % (the
output should go up); 10 % random pixels give the chance level (relprop.evaluation.detection's
direction_check). Candidates (CRP options):

- ``split``: the seed's ``R+ - R-`` at the box head, z+ below (each part normalized to 1);
- ``split-contrast``: the same minus the mean map of the other three box outputs;
- ``signed``: the head's signed contributions ``a_i w_ij`` (LRP-0 at the head, seeded with the
  output's value; conserving below: the map sums to the output minus its bias), z+ below;
- ``signed-contrast``: ``signed`` minus the mean of the other three outputs' signed maps;
- ``lrp0``: ``signed`` with LRP-0 below (equal to gradient x input of the output in ReLU networks,
  tested; not where GroupNorm sits in the head, as in FCOS: GroupNorm takes the identity rule);
- ``lrp0-norm``: ``lrp0`` with GroupNorm and LayerNorm taken as the linear maps they are with
  their std held constant (``norm-epsilon`` at ε = 0): gradient x input of the output with every
  norm's std detached (tested);
- ``gradxinput``: gradient x input of the output by autograd (the reference, not a CRP map).

    python benchmarks/box_direction.py /tmp/scenes --checkpoint /tmp/fcos.pt --images 20
    python benchmarks/box_direction.py /tmp/scenes --random fcos_resnet18_fpn --images 10
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from relprop import Composite  # noqa: E402
from relprop.core.rules import EpsilonRule  # noqa: E402
from relprop.core.splitting import SignedSplit  # noqa: E402
from relprop.detection.builders import DETECTORS, build_detector, from_metadata  # noqa: E402
from relprop.detection.crp import CRP, Request  # noqa: E402
from relprop.detection.families import dense_outputs, head_level  # noqa: E402
from relprop.detection.ssd import locate_anchor  # noqa: E402
from relprop.detection.yolo import dfl_seed  # noqa: E402
from relprop.evaluation.detection import (  # noqa: E402
    direction_check,
    offset_gradient_x_input,
    raw_box_outputs,
)

Z_RULE = EpsilonRule(0.0)
LRP0 = Composite(rules={nn.Conv2d: Z_RULE, nn.Linear: Z_RULE}, input_rule=Z_RULE, maxpool="wta",
                 split=SignedSplit(epsilon=0.0))
CANDIDATES = {
    "split": {},
    "split-contrast": {"box_contrast": True},
    "signed": {"box_rule": "signed"},
    "signed-contrast": {"box_rule": "signed", "box_contrast": True},
    "lrp0": {"box_rule": "signed", "box_composite": LRP0},
    "lrp0-norm": {"box_rule": "lrp0"},  # relprop detect --box-rule lrp0
}
# candidates whose map is meant to sum to the output minus the head's bias (the rest normalize)
SIGNED = ("signed", "lrp0", "lrp0-norm", "gradxinput")


def load(args: argparse.Namespace) -> tuple[nn.Module, dict]:
    if args.checkpoint:
        checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model = from_metadata(checkpoint)
        model.load_state_dict(checkpoint["state_dict"])
        meta = {k: checkpoint.get(k) for k in ("arch", "map50", "epochs", "steps", "train_seconds")}
    else:
        torch.manual_seed(args.seed)
        model = build_detector(args.random, 11, args.size, score_thresh=1e-3)  # untrained: low scores
        meta = {"arch": args.random, "weights": "random"}
    return model.eval(), meta


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenes", type=Path)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--random", choices=DETECTORS)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--per-image", type=int, default=2, help="top detections explained per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated")
    parser.add_argument("--out", type=Path, help="json file for the rates")
    args = parser.parse_args(argv)
    chosen = [c for c in args.candidates.split(",") if c]
    torch.set_num_threads(1)
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    model, meta = load(args)
    explainers = {name: CRP(model, **CANDIDATES[name]) for name in chosen}
    methods = [*chosen, "gradxinput"]
    first = next(iter(explainers.values()))
    names = first.family.box_outputs
    coco = json.loads((args.scenes / "val.json").read_text())
    generator = torch.Generator().manual_seed(args.seed)
    counts = {m: {o: {"positive": 0, "negative": 0, "random": 0} for o in names} for m in methods}
    # map sum / (output - head bias) per signed method, at the input and at the pyramid level
    ratios: dict[str, list[float]] = {f"{m}{at}": [] for m in methods if m in SIGNED
                                      for at in ("", "@pyramid") if m in explainers or not at}
    explained, started = 0, time.time()
    for meta_image in coco["images"][: args.images]:
        image = to_tensor(Image.open(args.scenes / meta_image["file_name"]).convert("RGB"))
        out = first.detect([image])
        for d in range(min(args.per_image, len(out.detections[0]["scores"]))):
            maps = {}
            for name, crp in explainers.items():
                rows = crp.explain(out, [Request(0, d, o) for o in names]).sum(1)
                maps[name] = dict(zip(names, rows, strict=True))
            maps["gradxinput"] = offset_gradient_x_input(first, out, d)
            targets = explained_parts(first, out, d)
            for m in (m for m in methods if m in SIGNED):
                ratios[m] += [float(maps[m][o].sum()) / t for o, t in zip(names, targets, strict=True)]
                if m in explainers:
                    pyramid = pyramid_sums(explainers[m], out, d)
                    ratios[f"{m}@pyramid"] += [r / t for r, t in zip(pyramid, targets, strict=True)]
            result = direction_check(first, out, d, maps, generator)
            for m in methods:
                for o in names:
                    for kind in ("positive", "negative", "random"):
                        counts[m][o][kind] += bool(result[m][o][kind])
            explained += 1
        print(f"{explained} detections, {time.time() - started:.0f}s", file=sys.stderr, flush=True)
    rows = {}
    for m in methods:
        rows[m] = {}
        for o in names:
            c = counts[m][o]
            rows[m][o] = {k: c[k] / max(1, explained) for k in c}
            rows[m][o]["positive_ci"] = wilson(c["positive"], explained)
            rows[m][o]["negative_ci"] = wilson(c["negative"], explained)
    shares = {m: {"mean": sum(abs(1 - r) for r in v) / max(1, len(v)),
                  "median_ratio": sorted(v)[len(v) // 2] if v else math.nan} for m, v in ratios.items()}
    report = {"detector": meta, "detections": explained, "images": args.images, "rates": rows,
              "unexplained_share": shares,
              "seconds": round(time.time() - started), "command": " ".join(sys.argv)}
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def explained_parts(crp: CRP, out, detection: int) -> list[float]:
    """Each box output of a detection minus its head bias: what a conserving signed map sums to
    (the box layer's inputs' contributions); what the map misses is the biases' share below.
    YOLO's DFL distance enters through its bins' gradient ``g``: ``sum_b g_b (z_b - bias_b)``."""
    anchor = int(out.detections[0]["anchors"][detection])
    with torch.no_grad():
        dense = dense_outputs(crp.detector, out.x[:1], crp.backbone)
    position = locate_anchor(out.levels, anchor)
    conv = head_level(crp.detector, "box", position.level).conv
    bias = (conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)).detach()
    if "box_logits" in dense[3]:
        logits = dense[3]["box_logits"][0, anchor]
        seeds = [dfl_seed(logits[None], j) for j in range(4)]
        return [float((g[0] * (logits[c] - bias[c])).sum()) for c, g in seeds]
    raw = raw_box_outputs(dense)[0, anchor]
    return [float(raw[j] - bias[4 * position.box + j]) for j in range(4)]


def pyramid_sums(crp: CRP, out, detection: int) -> list[float]:
    """Each box output's relevance summed at the pyramid feature it reads (below the head tower)."""
    position = locate_anchor(out.levels, int(out.detections[0]["anchors"][detection]))
    with torch.no_grad():
        feature = list(crp.engine.forward(out.x[:1]).output.values())[position.level]
        return [float(crp.head_relevance("box", position, feature, j).sum()) for j in range(4)]


def markdown(report: dict) -> str:
    """The docs' table: per candidate, its + and − rows with 95 % Wilson intervals, then the
    share of random-pixel removals that lowered the output (chance for +; 1 − it for −)."""
    rates = report["rates"]
    first = next(iter(rates.values()))
    outputs = list(first)
    lines = [f"{report['detector']}: {report['detections']} detections", "",
             "| candidate | " + " | ".join(outputs) + " |", "|---|" + "---|" * len(outputs)]
    for m, per in rates.items():
        for side, sign in (("positive", "+"), ("negative", "−")):
            cells = [_rate_cell(per[o][side], per[o][f"{side}_ci"]) for o in outputs]
            lines.append(f"| {m} {sign} | " + " | ".join(cells) + " |")
    lines.append("| random 10 % removed: lower | " + " | ".join(_percent(first[o]["random"]) for o in outputs) + " |")
    for m, share in report.get("unexplained_share", {}).items():
        lines.append(f"\n{m}: mean |1 - map sum / (output - head bias)| = {share['mean']:.3f} "
                     f"(median of the ratio {share['median_ratio']:.3f})")
    return "\n".join(lines)


def _rate_cell(rate: float, interval: tuple[float, float]) -> str:
    low, high = interval
    return f"{_percent(rate)} [{low * 100:.0f}, {high * 100:.0f}]"


def _percent(share: float) -> str:
    return f"{share * 100:.0f} %"


if __name__ == "__main__":
    sys.exit(main())
