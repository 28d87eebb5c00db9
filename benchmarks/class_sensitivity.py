"""Does a map explain *this* class? Top-1 vs runner-up map correlation, and Insertion/Deletion.

    nice python benchmarks/class_sensitivity.py --per-class 2 --out bench_out/class_sensitivity.md \\
        --methods ours lrp-contrastive "lrp-contrastive:seed=clrp" gradcam gradient
    python benchmarks/class_sensitivity.py --device cuda --out bench_out/class_sensitivity250.md  # all 250

For each tin10 val image (shared ResNet-18, 112 px) and each method, the maps of the predicted
class and of the runner-up class are computed; the table gives the median (and quartiles) of their
Pearson correlation (2-D channel sums; goal for a class-discriminative method: <= 0.3) and the
paper-protocol Insertion, Deletion and ID of the top-1 map, scored on the explained (top-1) class.
Images come in class order (`--limit 20` is 20 goldfish: use `--per-class`).
A method spec is `name[:key=value,...]` (keywords go to `get_method`, e.g. `seed=sglrp`).
Rows are kept in `--cache` (jsonl) so an interrupted run resumes; a bad image is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def parse_spec(spec: str) -> tuple[str, dict[str, object]]:
    """`name:key=value,key=value` -> (name, keywords); numbers become numbers."""
    name, _, rest = spec.partition(":")
    options: dict[str, object] = {}
    for pair in filter(None, rest.split(",")):
        key, _, value = pair.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def tin10_images(info, limit: int | None, per_class: int | None, split: str = "val"):
    """(item, normalized input) of tin10's `split` images, in the evaluation's order."""
    from relprop.data import discover, load_item, select
    from relprop.errors import ImageError
    from relprop.images import BoundedTransform
    from relprop.models import preprocessing

    root = SHARED / "data" / "tin10" / split
    dataset = discover(root, info.classes, info.class_names)
    transform = BoundedTransform(preprocessing(info), info.preprocessing.resize)
    for item in select(dataset.items, per_class, limit):
        try:
            yield item, load_item(root, item, transform, info)[0]
        except ImageError as error:
            tqdm.write(f"skipping {item.path}: {error}", file=sys.stderr)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else float("nan")


def measure(method, model, x: torch.Tensor, info) -> dict[str, float]:
    """Correlation of the top-1 and runner-up maps, and ID of the top-1 map (its own class)."""
    from relprop.evaluation.metrics import insertion_deletion

    with torch.no_grad():
        top2 = model(x).topk(2, dim=1).indices[0]
    maps = method.attribute(x.expand(2, -1, -1, -1).contiguous(), target=top2.tolist())
    flat = method.to_2d(maps).float().cpu()
    scores = insertion_deletion(model, x, flat[:1], top2[:1].cpu(), "paper", mean=info.mean,
                                std=info.std)
    return {"corr": pearson(flat[0], flat[1]), "ins": float(scores.insertion[0]),
            "del": float(scores.deletion[0]), "id": float(scores.id[0])}


def table(rows: list[dict], specs: list[str]) -> str:
    lines = ["| method | images | corr top-1 vs runner-up: median [q25, q75] | Insertion ↑ | Deletion ↓ | ID ↑ |",
             "|---|---|---|---|---|---|"]
    for spec in specs:
        mine = [r for r in rows if r["method"] == spec]
        if not mine:
            continue
        corr = np.array([r["corr"] for r in mine])
        q25, q50, q75 = np.nanpercentile(corr, [25, 50, 75])
        mean = {k: np.mean([r[k] for r in mine]) for k in ("ins", "del", "id")}
        lines.append(f"| {spec} | {len(mine)} | {q50:.3f} [{q25:.3f}, {q75:.3f}] | {mean['ins']:.3f} | "
                     f"{mean['del']:.3f} | {mean['id']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["ours", "lrp-contrastive", "gradcam", "gradient"])
    parser.add_argument("--limit", type=int, default=None, help="first N images (default: all 250)")
    parser.add_argument("--per-class", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench_out/class_sensitivity.md"))
    parser.add_argument("--cache", type=Path, default=None, help="jsonl of finished rows (default: OUT.jsonl)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from relprop.methods import get_method
    from relprop.models import load_model

    model, info = load_model(SHARED / "models" / "resnet18_tin10.pt")
    model = model.to(args.device)
    cache = args.cache or args.out.with_suffix(".jsonl")
    cache.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in cache.read_text().splitlines()] if cache.is_file() else []
    done = {(r["method"], r["image"]) for r in rows}
    methods = {}
    for spec in args.methods:
        name, options = parse_spec(spec)
        methods[spec] = get_method(name, model, mean=info.mean, std=info.std, **options)
    images = list(tin10_images(info, args.limit, args.per_class))
    with cache.open("a") as sink:
        for item, x in tqdm(images, desc="class sensitivity", unit="image"):
            for spec, method in methods.items():
                if (spec, item.path) in done:
                    continue
                row = {"method": spec, "image": item.path,
                       **measure(method, model, x[None].to(args.device), info)}
                rows.append(row)
                sink.write(json.dumps(row) + "\n")
                sink.flush()
    paths = {item.path for item, _ in images}
    text = table([r for r in rows if r["image"] in paths], args.methods)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
