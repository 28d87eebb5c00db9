"""Mean ID of a few methods in every protocol, with reference and with random tie-breaking, on the
same maps (each map computed once, scored in every protocol and tie mode by
`relprop.evaluation.metrics.insertion_deletion`, as `relprop evaluate` scores it): does a method
(Heat Quantization) gain from how its ties are ordered?

    PYTHONPATH=src python benchmarks/tie_modes.py --per-class 2 --out bench_out/tie_modes.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from relprop.data import discover, load_item, select
from relprop.evaluation.metrics import insertion_deletion
from relprop.evaluation.protocols import PROTOCOLS, TIES
from relprop.evaluation.statistics import mean_sem_ci
from relprop.methods import HQ_SUFFIX, HeatQuantized, get_method
from relprop.models import load_model, preprocessing

SHARED = Path(__file__).resolve().parents[2] / "shared"


def maps_of(name: str, model: torch.nn.Module, info, x: torch.Tensor) -> torch.Tensor:
    """The 2-D maps `relprop evaluate` ranks for method `name` (summed channels, HQ if asked)."""
    base = get_method(name.removesuffix(HQ_SUFFIX), model, batch_size=len(x), mean=info.mean,
                      std=info.std)
    maps = base.attribute(x)
    if name.endswith(HQ_SUFFIX):
        return HeatQuantized(base, "sum").quantize(maps)[:, 0].float()
    return base.to_2d(maps, "sum").float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(SHARED / "models" / "resnet18_tin10.pt"))
    parser.add_argument("--data", default=str(SHARED / "data" / "tin10" / "val"))
    parser.add_argument("--methods", default="ours-ref+hq,lrp-faithful,gradcam,ig")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--rise-step", type=int, help="RISE pixels per frame (default: image width)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    model, info = load_model(args.weights)
    model = model.to(args.device).eval()
    dataset = discover(args.data, info.classes, info.class_names)
    items = sorted(select(dataset.items, args.per_class), key=lambda it: it.path)
    transform = preprocessing(info)
    x = torch.stack([load_item(dataset.root, it, transform, info)[0] for it in items]).to(args.device)
    labels, ids = [it.label for it in items], [it.path for it in items]
    scores: dict[str, dict[str, list[float]]] = {}
    started = time.perf_counter()
    for name in args.methods.split(","):
        heat = maps_of(name, model, info, x).cpu()
        for protocol in args.protocols.split(","):
            for ties in TIES:
                step = args.rise_step if protocol == "rise" else None
                result = insertion_deletion(model, x, heat, labels, protocol, mean=info.mean,
                                            std=info.std, step=step, ties=ties, seed=args.seed,
                                            ids=ids, batch_size=128)
                scores.setdefault(name, {})[f"{protocol}/{ties}"] = result.id.tolist()
            print(f"{name} {protocol} done at {time.perf_counter() - started:.0f} s", flush=True)
    lines = [f"{len(items)} images, seed {args.seed}; mean ID (random - reference: paired mean "
             "and 95 % bootstrap CI)", "",
             "| method | protocol | ID, ties reference | ID, ties random | random − reference |",
             "|---|---|---|---|---|"]
    for name, found in scores.items():
        for protocol in args.protocols.split(","):
            ref, rnd = (np.array(found[f"{protocol}/{t}"]) for t in TIES)
            diff, _, low, high = mean_sem_ci(list(rnd - ref), n_boot=10000, seed=0)
            lines.append(f"| {name} | {protocol} | {ref.mean():.3f} | {rnd.mean():.3f} | "
                         f"{diff:+.3f} [{low:+.3f}, {high:+.3f}] |")
    print("\n".join(lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"images": ids, "seed": args.seed, "scores": scores,
                                        "rise_step": args.rise_step}, indent=1) + "\n")


if __name__ == "__main__":
    main()
