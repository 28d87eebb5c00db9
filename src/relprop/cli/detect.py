"""`relprop detect`: run an SSD detector and explain each detection's class and box with CRP."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relprop.cli.common import add_model_options, plan_jobs, read_classes
from relprop.cli.outputs import Manifest, prepare_out
from relprop.defaults import TORCHVISION_DETECTORS
from relprop.devices import resolve_device
from relprop.errors import ImageError, RelpropError, TargetError

DESCRIPTION = """\
Detect objects with a torchvision SSD (SSD300-VGG16, or any torchvision SSD built with
--model-def, such as the ResNet-18 SSD in ../shared/models) and explain every detection scoring
at least --score-threshold (at most --max-detections per image, best first) by Contrastive
Relevance Propagation (CRP; Tsunakawa et al., IJCNN 2019). For each image it prints one line per
detection and writes, under OUT/<image name>/:

  detections.png     the image with every explained detection drawn (class, score)
  det<i>.png         detection i: the image with its box, then its class map and its four box maps
                     (cx, cy, w, h) over the image, in one panel
  det<i>_<map>.npy   with --save-maps: each map as float32 (H, W) on the original image

and OUT/detections.jsonl: one JSON line per explained detection (image, detection index, class,
score, box in original pixels, anchor index and head level, panel file), and OUT/manifest.json
(the files this run wrote). A re-run into the same OUT removes the files of the previous run it
did not write again (see `relprop explain --help`); OUT inside an input folder is not searched.

What the maps say (red = positive relevance, blue = negative; each map sums to zero):
  class   red: evidence for the detected class; blue: evidence for the other classes
          (contrastive; with --no-contrast plain LRP of the class logit, which sums to one)
  cx, cy  red: what pushes the box centre right (cx) / down (cy) from its default box;
          blue: what pushes it left / up
  w, h    red: what makes the box wider / taller; blue: narrower / shorter

Maps are computed in the detector's own input space (after its resize and normalization) and
resized onto the original image for display.
"""

EPILOG = """\
examples:
  relprop detect photo.jpg --weights ../shared/models/ssd_resnet18_tin10.pt \\
      --model-def ../shared/models/ssd_resnet18_tin10.py:from_metadata --out detected
  relprop detect street.jpg --weights ssd300_vgg16_coco.pth --arch ssd300_vgg16 \\
      --num-classes 91 --score-threshold 0.4 --max-detections 3 --out street
  relprop detect img.jpg --weights det.pt --model-def det.py:from_metadata \\
      --target-class lemon --out what-if      # explain "lemon" for every detected box

supported detectors:
  torchvision SSD whose backbone relprop can trace (Conv2d, BatchNorm, ReLU, max/avg pool,
  residual adds, SSD300's L2Norm), SSDLite-MobileNetV3 included (Hardswish passes relevance
  through like ReLU; squeeze-excitation gates leave all relevance with the gated features).

exit status:
  0  every image was processed
  1  some inputs failed (each named on stderr), or a bad model or option
  2  bad usage (unknown option, missing argument)
"""



def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `relprop detect`."""
    parser = subparsers.add_parser(
        "detect",
        help="detect objects with an SSD and explain each detection's class and box (CRP)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                        help="image files, or folders searched recursively for images")
    parser.add_argument("--score-threshold", type=float, default=0.5, metavar="S",
                        help="explain detections scoring at least S (default: 0.5)")
    parser.add_argument("--max-detections", type=int, default=5, metavar="N",
                        help="explain at most N detections per image, best first (default: 5)")
    parser.add_argument("--target-class", metavar="K",
                        help="what-if: explain class K (index, id or name) for every detected box "
                             "instead of the detected class")
    parser.add_argument("--no-contrast", action="store_true",
                        help="plain LRP of the class logit instead of the contrastive map")
    parser.add_argument("--include-background", action="store_true",
                        help="contrast the class against the background class too")
    parser.add_argument("--box-contrast", action="store_true",
                        help="subtract the mean of the other three offsets' maps from each box map")
    parser.add_argument("--split", choices=("ratio", "symmetric", "signed"), default="ratio",
                        help="relevance split at residual adds (default: ratio, the paper's)")
    parser.add_argument("--save-maps", action="store_true",
                        help="also write every map as det<i>_<map>.npy")
    parser.add_argument("--out", default="detected", metavar="DIR",
                        help="output folder (created; default: ./detected)")
    parser.add_argument("--device", default="auto", metavar="DEV",
                        help="cpu, cuda, cuda:1, ... (default: auto, a GPU when there is one)")
    # No --resize/--crop/--mean/--std: a torchvision SSD resizes and normalizes inside the model.
    add_model_options(parser, preprocessing=False, arch_choices=TORCHVISION_DETECTORS)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Detect and explain every image; return 1 if any input failed, after all the others."""
    from tqdm import tqdm  # deferred: keeps relprop --help fast

    from relprop.detection.crp import CRP, OUTPUTS, Request  # deferred: keeps relprop --help fast
    from relprop.detection.ssd import num_classes_of  # deferred: keeps relprop --help fast
    from relprop.images import load_image  # deferred: keeps relprop --help fast
    from relprop.models import class_names_of, load_detector  # deferred: keeps relprop --help fast

    _check_options(args)
    device = resolve_device(args.device)
    out = prepare_out(args.out)
    classes, class_names = read_classes(args.classes)
    model, meta = load_detector(args.weights, args.model_def, args.arch, args.num_classes,
                                classes=classes, class_names=class_names, offline=args.offline)
    model.to(device)
    names = class_names_of(meta, num_classes_of(model), detector=True)
    target = parse_class(args.target_class, meta, names)
    crp = CRP(model, contrast=not args.no_contrast, include_background=args.include_background,
              box_contrast=args.box_contrast, split=args.split, rules=_activations_passed_through())
    jobs, failures = plan_jobs(args.inputs, "detect", exclude=out)
    total = len(jobs) + len(failures)  # empty folders count as failed inputs
    manifest = Manifest(out, "detect")
    with open(manifest.add(out / "detections.jsonl"), "w", encoding="utf-8") as log:
        for path, name in tqdm(jobs, unit="image", desc="detect", file=sys.stderr):
            try:
                image = _to_tensor(load_image(path))
            except ImageError as error:
                failures.append(str(error))
                tqdm.write(f"relprop detect: error: {error}", file=sys.stderr)
                continue
            result = crp.detect([image.to(device)])
            det = result.detections[0]
            chosen = _chosen(det["scores"], args.score_threshold, args.max_detections)
            requests = [Request(0, d, o, target) for d in chosen for o in OUTPUTS]
            maps = crp.explain(result, requests).cpu() if requests else None
            folder = out / name
            folder.mkdir(parents=True, exist_ok=True)
            records = _write_image(folder, name, path, image, det, chosen, maps, names, target,
                                   args.save_maps, manifest)
            for record in records:
                log.write(json.dumps(record, ensure_ascii=False) + "\n")
                tqdm.write(_summary(record), file=sys.stdout)
            if not records:
                tqdm.write(f"{path}: no detection scores at least {args.score_threshold}",
                           file=sys.stdout)
    manifest.finish()
    if failures:
        print(f"relprop detect: {len(failures)} of {total} inputs failed (named above)",
              file=sys.stderr)
        return 1
    return 0


def _check_options(args: argparse.Namespace) -> None:
    if args.max_detections < 1:
        raise RelpropError(f"--max-detections {args.max_detections}: must be at least 1")
    if not 0.0 <= args.score_threshold <= 1.0:
        raise RelpropError(f"--score-threshold {args.score_threshold}: must be in [0, 1]")


def _activations_passed_through() -> dict:
    """Relevance passes these unchanged, as it passes ReLU (SSDLite's MobileNetV3 uses Hardswish)."""
    import torch  # deferred: keeps relprop --help fast

    return {torch.nn.Hardswish: "pass"}


def parse_class(text: str | None, meta: dict[str, Any], names: Sequence[str]) -> int | None:
    """`--target-class` as an index, a class id (e.g. a wnid) or a class name."""
    if text is None:
        return None
    if text.strip().isdigit():
        index = int(text)
        if not 0 <= index < len(names):
            raise TargetError(f"--target-class {index}: the detector has classes 0..{len(names) - 1}")
        return index
    wanted = text.strip().lower()
    for labels in (meta.get("classes") or [], meta.get("class_names") or [], names):
        lowered = [str(label).lower() for label in labels]
        if wanted in lowered and len(lowered) == len(names):
            return lowered.index(wanted)
    raise TargetError(f"--target-class {text!r}: not a class index, id or name of this detector")


def _to_tensor(image: Any) -> Any:
    from torchvision.transforms.functional import to_tensor  # deferred: keeps relprop --help fast

    return to_tensor(image)


def _chosen(scores: Any, threshold: float, cap: int) -> list[int]:
    return [int(d) for d in (scores >= threshold).nonzero().flatten()[:cap]]


def _write_image(folder: Path, name: str, path: Path, image: Any, det: dict, chosen: Sequence[int],
                 maps: Any, names: Sequence[str], target: int | None,
                 save_maps: bool, manifest: Manifest) -> list[dict[str, Any]]:
    """Drawings, panels and (optionally) raw maps of one image; its detections.jsonl records."""
    import numpy as np  # deferred: keeps relprop --help fast

    from relprop.detection.crp import OUTPUTS, to_image  # deferred: keeps relprop --help fast

    # deferred: keeps relprop --help fast
    from relprop.viz import draw_detections, save_detection_panel

    rgb = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    size = tuple(image.shape[-2:])
    boxes = [det["boxes"][d].tolist() for d in chosen]
    labels = [int(det["labels"][d]) for d in chosen]
    scores = [float(det["scores"][d]) for d in chosen]
    captions = [f"{i}: {names[k]} {s:.0%}" for i, (k, s) in enumerate(zip(labels, scores, strict=True))]
    draw_detections(manifest.add(folder / "detections.png"), rgb, boxes, captions)
    records = []
    for i, d in enumerate(chosen):
        heats = {o: to_image(maps[i * len(OUTPUTS) + j], size).numpy()
                 for j, o in enumerate(OUTPUTS)}
        explained = labels[i] if target is None else target
        title = f"{path.name} · detection {d}: {names[labels[i]]} {scores[i]:.0%}"
        if explained != labels[i]:
            title += f" · explaining {names[explained]}"
        panel = folder / f"det{d}.png"
        save_detection_panel(manifest.add(panel), rgb, boxes[i], heats, title, names[explained])
        if save_maps:
            for o, heat in heats.items():
                np.save(manifest.add(folder / f"det{d}_{o}.npy"), heat.astype(np.float32))
        records.append({
            "image": str(path), "output": name, "detection": d, "label": labels[i],
            "class_name": names[labels[i]], "score": round(scores[i], 6),
            "box": [round(v, 2) for v in boxes[i]], "anchor": int(det["anchors"][d]),
            "level": int(det["levels"][d]), "explained_class": explained,
            "panel": panel.relative_to(folder.parent).as_posix(),
        })
    return records


def _summary(record: dict[str, Any]) -> str:
    x0, y0, x1, y1 = record["box"]
    return (f"{record['image']}: #{record['detection']} {record['class_name']} "
            f"{record['score']:.1%} [{x0:.0f},{y0:.0f},{x1:.0f},{y1:.0f}] -> {record['panel']}")
