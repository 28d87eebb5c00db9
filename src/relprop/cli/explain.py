"""`relprop explain`: heatmaps for a user's own images, as PNG overlays, raw maps and one panel."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relprop.cli.common import (
    Job,
    RegistryHelpFormatter,
    add_model_options,
    check_method_names,
    load_model_from_args,
    plan_jobs,
)
from relprop.cli.outputs import Manifest, prepare_out
from relprop.defaults import DEFAULT_WEIGHTS
from relprop.devices import resolve_device
from relprop.errors import ImageError, RelpropError, TargetError

DESCRIPTION = """\
Explain what a classifier bases its prediction on, for each image given (files, or folders
searched recursively for image files). For every image it prints the predicted class and its
probability and writes, under OUT/<image name>/:

  panel.png       the image as the model saw it, then every method's map side by side
  METHOD.png      the map of one method over the image, with a colour bar
  METHOD.npy      that map as float32 (H, W): relevance summed over colour channels
  original.png    the image as the model saw it (after resizing and cropping)

and, for the whole run, OUT/predictions.jsonl (one JSON line per image: file, predicted class,
probability, explained class, output folder), for several images OUT/overview.png (the
panels of the first 8 images in one picture), and OUT/manifest.json (the files this run wrote).

Re-running into the same OUT: the files the previous run's manifest lists and this run did not
write again (maps of methods no longer asked for, folders of images no longer given, an old
overview.png) are removed, so OUT always shows one run. Files no manifest lists are never
touched. When OUT lies inside an input folder, it is left out of the inputs.

Colours: positive relevance is red, negative relevance blue, zero transparent (the photo shows
through); signed maps are centred at zero. Maps that are never negative (Grad-CAM, Score-CAM)
and --sign positive use a yellow-to-red scale from zero.

Any image Pillow reads is accepted: JPEG, PNG, TIFF, WebP, grayscale, RGBA (composited on white),
palette, CMYK, 16-bit, EXIF-rotated phone photos, very large photos. Files that are not images,
are corrupt, or are decompression bombs (more than about 89 megapixels) are reported on one line
each; the other images are still processed. So are images whose model input, after resizing,
would be more than 200,704 pixels (four 224x224 inputs) or more than 8 times as long as wide (a 5000x3 strip resized
to 112 pixels high would be 186666 pixels wide).

Grad-CAM and Score-CAM use layer4[-1] of a ResNet (as the paper did) and, on other networks, the
last feature map the top logit depends on, found from one forward and backward pass (e.g.
VGG-11's features.20, DenseNet's features.norm5; ViT/DeiT: the last block's norm1 with the patch
tokens laid on their grid; Swin: its channels-last map); --cam-layer NAME picks another. A method that cannot
run on the model is reported on one line and the other methods still run.

--target and relprop's LRP: the map of the paper's method (ours) hardly depends on the
explained class. On 20 tin10 images (ResNet-18), the `ours` map of each of the 9 other classes
correlates with the map of the predicted class at a median of 0.984 (Grad-CAM: -0.085): read
such a map as "what the model looked at", not as evidence for that class. relprop has no
class-discriminative LRP method other than lrp-contrastive: use --methods lrp-contrastive.
"""

EPILOG = """\
methods (the paper's method, its ablations and reference numerics, plain LRP, the baselines):
@@METHODS@@

examples:
  relprop explain photo.jpg --out explained     # torchvision's ImageNet ResNet-50 (downloaded once)
  relprop explain photo.jpg --arch resnet101 --weights DEFAULT --out explained
  relprop explain photo.jpg --weights resnet18_tin10.pt --out explained
  relprop explain ../shared/data/tin10/val/n01882714 --weights ../shared/models/resnet18_tin10.pt \\
      --methods ours,gradcam,ig --hq --out koalas
  relprop explain scan.tif --weights model.pt --arch resnet50 --resize 224 --crop 0 \\
      --target 3 --sign positive --out out

exit status:
  0  every image was explained
  1  some inputs failed (each named on stderr; the others were still explained), a method
     could not run on the model (the others still ran), or a bad model, method, target,
     device or output folder
  2  bad usage (unknown option, missing argument)
"""

DEFAULT_METHODS = "ours,gradcam,ig"
OVERVIEW_ROWS = 8


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `relprop explain`."""
    parser = subparsers.add_parser(
        "explain",
        help="heatmaps for your own images (overlays, raw maps, side-by-side panel)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=RegistryHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                        help="image files, or folders searched recursively for images")
    parser.add_argument("--methods", default=DEFAULT_METHODS, metavar="M1,M2,...",
                        help=f"comma-separated methods, see below (default: {DEFAULT_METHODS})")
    parser.add_argument("--target", metavar="K",
                        help="class to explain: an index, a class id or a class name "
                             "(default: each image's predicted class); LRP maps hardly change "
                             "with it, see below")
    parser.add_argument("--hq", action="store_true",
                        help="Heat Quantization: quantize the LRP methods' maps to 8 levels, as in "
                             "the paper (name+hq does it for any one method)")
    parser.add_argument("--sign", choices=("all", "positive"), default="all",
                        help="all: signed maps, red positive / blue negative (default); "
                             "positive: only positive relevance")
    parser.add_argument("--out", default="explained", metavar="DIR",
                        help="output folder (created; default: ./explained)")
    parser.add_argument("--device", default="auto", metavar="DEV",
                        help="cpu, cuda, cuda:1, mps, ... (default: auto, a GPU when there is one)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="images per forward/backward pass (default: 8)")
    add_model_options(parser, default_weights=DEFAULT_WEIGHTS)
    parser.add_argument("--cam-layer", metavar="NAME",
                        help="module of Grad-CAM and Score-CAM, e.g. layer4.1 or features.29 "
                             "(default: found automatically, see below)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Explain every image; return 1 if any input or method failed, after all the others."""
    from relprop.images import BoundedTransform  # deferred: keeps relprop --help fast
    from relprop.models import class_names_of, preprocessing  # deferred: keeps relprop --help fast

    methods = check_method_names(args.methods)
    if args.batch_size < 1:
        raise RelpropError(f"--batch-size {args.batch_size}: must be at least 1")
    device = resolve_device(args.device)
    out = prepare_out(args.out)
    model, meta = load_model_from_args(args, "explain")
    model.to(device)
    target = parse_target(args.target, meta)
    method_failures: list[str] = []
    explainers = build_methods(methods, model, meta, args.hq, args.cam_layer, method_failures)
    jobs, failures = plan_jobs(args.inputs, "explain", exclude=out)
    total = len(jobs) + len(failures)  # an empty folder counts as one failed input
    transform = BoundedTransform(preprocessing(meta), meta["resize"])
    context = Context(model, meta, transform, explainers, class_names_of(meta), target,
                      device, args.sign, out, Manifest(out, "explain"), method_failures)
    overview = explain_all(context, jobs, args.batch_size, failures)
    if len(overview) > 1:
        from relprop.viz import save_panel  # deferred: keeps relprop --help fast

        save_panel(context.manifest.add(out / "overview.png"), overview, sign=args.sign)
    removed = context.manifest.finish()
    if removed:
        print(f"relprop explain: removed {len(removed)} file(s) of the previous run in {out} "
              "that this run did not write again", file=sys.stderr)
    if failures:
        print(f"relprop explain: {len(failures)} of {total} inputs failed (named above)",
              file=sys.stderr)
    if method_failures:
        print(f"relprop explain: method(s) {', '.join(method_failures)} could not run on this "
              "model (named above); the others ran", file=sys.stderr)
    return 1 if failures or method_failures else 0


def explain_all(context: Context, jobs: Sequence[Job], batch_size: int,
                failures: list[str]) -> list[Any]:
    """Batch by batch, with a progress bar; unreadable images are named and skipped.

    Appends to `failures`; returns the panel rows of the first images for the overview.
    """
    from tqdm import tqdm  # deferred: keeps relprop --help fast

    overview: list[Any] = []
    log_path = context.manifest.add(context.out / "predictions.jsonl")
    with open(log_path, "w", encoding="utf-8") as log, \
            tqdm(total=len(jobs), unit="image", desc="explain", file=sys.stderr,
                 disable=None) as bar:
        for batch in _batched(jobs, batch_size):
            loaded = []
            for job in batch:
                try:
                    loaded.append((job, _load(job, context.transform)))
                except ImageError as error:
                    failures.append(str(error))
                    tqdm.write(f"relprop explain: error: {error}", file=sys.stderr)
            for record, row in explain_batch(context, loaded):
                log.write(json.dumps(record, ensure_ascii=False) + "\n")
                tqdm.write(_summary_line(record), file=sys.stdout)
                if len(overview) < OVERVIEW_ROWS:
                    overview.append(row)
            bar.update(len(batch))
    return overview


def _load(job: Job, transform: Any) -> Any:
    """The model input of one image; a refused size names the file like a refused file."""
    from relprop.images import load_image  # deferred: keeps relprop --help fast

    image = load_image(job.path)
    try:
        return transform(image)
    except ImageError as error:
        raise ImageError(f"{job.path}: {error}") from None


def method_failed(context_failures: list[str], name: str, error: Exception) -> None:
    """One line for a method that cannot run on this model; the run goes on without it."""
    from tqdm import tqdm  # deferred: keeps relprop --help fast

    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    reason = first if isinstance(error, RelpropError) else f"{type(error).__name__}: {first}"
    tqdm.write(f"relprop explain: error: method {name} cannot run on this model: {reason}; "
               "the other methods go on", file=sys.stderr)
    context_failures.append(name)


def build_methods(names: Sequence[str], model: Any, meta: dict[str, Any], hq: bool,
                  cam_layer: str | None = None, failures: list[str] | None = None) -> dict[str, Any]:
    """One explainer per name, from the registry, with the model's normalization.

    `--hq` quantizes the LRP methods' maps, as the paper does: on a signed baseline map the
    level holding zero starts below zero, which would tint the whole background. A method that
    cannot be built for this model is reported and left out (into `failures`); with no method
    left, the run stops.
    """
    from relprop.methods import get_method  # deferred: keeps relprop --help fast

    def make(name: str) -> Any:
        return get_method(name, model, mean=meta["mean"], std=meta["std"], layer=cam_layer)

    methods = {}
    failures = [] if failures is None else failures
    for name in names:
        try:
            method = make(name)
            if hq and method.is_lrp and not name.endswith("+hq"):
                name = f"{name}+hq"
                method = make(name)
        except Exception as error:  # any model a method cannot handle: report it, go on
            if isinstance(error, RelpropError) and "--cam-layer" in str(error):
                raise  # the user's --cam-layer is wrong for every CAM method: stop here
            method_failed(failures, name, error)
            continue
        methods[name] = method
    if not methods:
        raise RelpropError(f"none of the methods {', '.join(names)} can run on this model")
    return methods


def parse_target(text: str | None, meta: dict[str, Any]) -> int | None:
    """`--target` as an index, a class id (e.g. a wnid) or a class name, case-insensitively."""
    if text is None:
        return None
    count = int(meta["num_classes"])
    if text.strip().lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < count:
            raise TargetError(f"--target {index}: the model has classes 0..{count - 1}")
        return index
    for key in ("classes", "class_names"):
        labels = [str(label).lower() for label in meta.get(key) or []]
        if text.strip().lower() in labels:
            return labels.index(text.strip().lower())
    raise TargetError(f"--target {text!r}: not a class index, id or name of this model")


@dataclass
class Context:
    """What every batch needs: the model, its preprocessing and explainers, where to write."""

    model: Any
    meta: dict[str, Any]
    transform: Any
    explainers: dict[str, Any]
    names: list[str]
    target: int | None
    device: Any
    sign: str
    out: Path
    manifest: Manifest
    method_failures: list[str]


def explain_batch(context: Context, loaded: Sequence[tuple[Job, Any]]) -> Iterator[tuple[dict, Any]]:
    """Predict, explain with every method, write each image's files; yield (record, panel row).

    Without a crop, photos of different aspect ratios give inputs of different sizes: each
    size is run as its own sub-batch.
    """
    for group in _same_shape_groups(loaded):
        yield from _explain_group(context, group)


def _same_shape_groups(loaded: Sequence[tuple[Job, Any]]) -> Iterator[list[tuple[Job, Any]]]:
    groups: dict[tuple[int, ...], list[tuple[Job, Any]]] = {}
    for job, tensor in loaded:
        groups.setdefault(tuple(tensor.shape), []).append((job, tensor))
    yield from groups.values()


def _explain_group(context: Context, group: Sequence[tuple[Job, Any]]) -> Iterator[tuple[dict, Any]]:
    import torch  # deferred: keeps relprop --help fast

    x = torch.stack([tensor for _, tensor in group]).to(context.device)
    with torch.no_grad():
        probs = torch.softmax(context.model(x).float(), dim=1).cpu()
    maps = {}
    for name, method in list(context.explainers.items()):
        try:
            maps[name] = _as_numpy(method.attribute(x, target=context.target))
        except Exception as error:  # e.g. a CAM layer that does not fit: drop the method
            method_failed(context.method_failures, name, error)
            del context.explainers[name]
    if not context.explainers:
        raise RelpropError("no method could run on this model (named above)")
    for i, (job, _) in enumerate(group):
        yield write_image_outputs(context, job, x[i].cpu().numpy(), probs[i],
                                  {name: m[i] for name, m in maps.items()})


def _as_numpy(maps: Any) -> Any:
    return maps.detach().float().cpu().numpy()


def write_image_outputs(context: Context, job: Job, x: Any, probs: Any,
                        maps: dict[str, Any]) -> tuple[dict, Any]:
    """Overlays, raw maps, original and panel for one image, plus its predictions.jsonl record."""
    import numpy as np  # deferred: keeps relprop --help fast

    # deferred: keeps relprop --help fast
    from relprop.viz import PanelRow, denormalize, heat_2d, save_overlay, save_panel, save_png

    folder = context.out / job.name
    folder.mkdir(parents=True, exist_ok=True)
    add = context.manifest.add
    image = denormalize(x, context.meta["mean"], context.meta["std"])
    save_png(add(folder / "original.png"), image)
    pred = int(probs.argmax())
    explained = pred if context.target is None else context.target
    heats = {}
    for name, relevance in maps.items():
        heats[name] = heat_2d(relevance)
        np.save(add(folder / f"{name}.npy"), heats[name])
        save_overlay(add(folder / f"{name}.png"), image, heats[name],
                     title=f"{name} · {context.names[explained]}", sign=context.sign)
    caption = f"{job.path.name}\n{context.names[pred]} {float(probs[pred]):.0%}"
    if explained != pred:
        caption += f"\nexplained: {context.names[explained]}"
    row = PanelRow(image, caption, heats)
    save_panel(add(folder / "panel.png"), [row], sign=context.sign)
    record = {
        "image": str(job.path),
        "output": job.name,
        "pred": pred,
        "pred_name": context.names[pred],
        "prob": round(float(probs[pred]), 6),
        "target": explained,
        "target_name": context.names[explained],
        "target_prob": round(float(probs[explained]), 6),
        "methods": list(maps),
    }
    return record, row


def _summary_line(record: dict) -> str:
    line = f"{record['image']}: {record['pred_name']} ({record['prob']:.1%})"
    if record["target"] != record["pred"]:
        line += f", explaining {record['target_name']} ({record['target_prob']:.1%})"
    return f"{line} -> {record['output']}/panel.png"


def _batched(items: Sequence[Job], size: int) -> Iterator[Sequence[Job]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
