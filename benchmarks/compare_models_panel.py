"""README overview panel: the shared ResNet-18 and a modern tin10 model on the same val images.

    python benchmarks/compare_models_panel.py --other convnext_atto_tin10.pt \
        --out docs/img/resnet18-vs-convnext-atto.png

One row per image (the first `--per-class` val images of each of the first `--classes` classes):
image | ResNet-18 lrp-split+hq | other lrp-split+hq | ResNet-18 Grad-CAM | other Grad-CAM; the caption
gives the true class and both predictions. Both checkpoints are read with `relprop.models.load_model`
and each image goes through each checkpoint's own preprocessing (the same, 112 px, for the tin10
checkpoints; the picture shown is the first model's input). A method that cannot run on a model
is reported on one line and its column left empty.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from relprop.data import discover, select  # noqa: E402
from relprop.errors import RelpropError  # noqa: E402
from relprop.images import load_image  # noqa: E402
from relprop.methods import get_method  # noqa: E402
from relprop.models import class_names_of, load_model, preprocessing  # noqa: E402
from relprop.viz import PanelRow, denormalize, save_panel  # noqa: E402

SHARED = ROOT.parent / "shared"
METHODS = (("lrp-split+hq", "LRP split+HQ"), ("gradcam", "Grad-CAM"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=SHARED / "models" / "resnet18_tin10.pt")
    parser.add_argument("--other", type=Path, required=True, help="the modern model's checkpoint")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "tin10" / "val")
    parser.add_argument("--classes", type=int, default=6, help="rows from this many classes")
    parser.add_argument("--per-class", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "resnet18-vs-modern.png")
    return parser.parse_args()


def label(info) -> str:
    """`ResNet-18` for the shared checkpoint, else the architecture name (`convnext_atto`)."""
    arch = str(info.arch).removeprefix("timm/")
    return {"resnet18": "ResNet-18"}.get(arch, arch)


def explain(model, info, x: torch.Tensor, device: str, failures: set[str]) -> dict[str, torch.Tensor]:
    """Each method's 2-D map of the predicted class, keyed by column title."""
    maps = {}
    for method, title in METHODS:
        column = f"{label(info)}\n{title}"
        try:
            maps[column] = get_method(method, model, mean=info.mean, std=info.std
                                      ).attribute(x.to(device))[0].sum(0).cpu()
        except RelpropError as error:
            if column not in failures:
                tqdm.write(f"{column.replace(chr(10), ' ')}: {str(error).splitlines()[0]}")
            failures.add(column)
    return maps


def main() -> None:
    args = parse_args()
    models = [load_model(path) for path in (args.base, args.other)]
    models = [(model.to(args.device), info) for model, info in models]
    base_info = models[0][1]
    data = discover(args.data, base_info.classes, base_info.class_names)
    items = [item for item in select(data.items, per_class=args.per_class)
             if item.label < args.classes]
    failures: set[str] = set()
    rows = []
    for item in tqdm(items, desc="images"):
        try:
            image = load_image(data.root / item.path)
        except RelpropError as error:  # keep going past a bad file
            tqdm.write(str(error))
            continue
        maps, predictions = {}, []
        for model, info in models:
            x = preprocessing(info)(image)[None]
            with torch.no_grad():
                predicted = int(model(x.to(args.device)).argmax())
            predictions.append(f"{label(info)}: {class_names_of(info)[predicted]}")
            maps.update(explain(model, info, x, args.device, failures))
        shown = denormalize(preprocessing(base_info)(image).numpy(), base_info.mean, base_info.std)
        caption = f"{class_names_of(base_info)[item.label]}\n" + "\n".join(predictions)
        rows.append(PanelRow(shown, caption, {k: v.numpy() for k, v in maps.items()}))
    order = [f"{label(info)}\n{title}" for _, title in METHODS for _, info in models]
    for row in rows:
        row.maps = {k: row.maps[k] for k in order if k in row.maps}
    print(f"compare_models_panel: wrote {save_panel(args.out, rows)} ({len(rows)} images)")


if __name__ == "__main__":
    main()
