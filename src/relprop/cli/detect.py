"""`relprop detect`: run a detector (SSD, RetinaNet, FCOS) and explain each detection's class and box with CRP."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from relprop.cli.common import add_model_options, read_classes
from relprop.detection.architectures import DETECTOR_ARCHS, architecture_lines
from relprop.detection.box_rules import BOX_RULES
from relprop.devices import resolve_device
from relprop.pipelines.outputs import prepare_out

if TYPE_CHECKING:
    from relprop.pipelines.detect import DetectionRecord

DESCRIPTION = """\
Detect objects with a torchvision SSD, RetinaNet or FCOS, or an Ultralytics YOLOv8 (one of the
architectures below by --arch, or any such detector built with --model-def, such as the ResNet-18
SSD in ../shared/models) and explain every detection scoring at least --score-threshold (at
most --max-detections per image, best first) by Contrastive Relevance Propagation (CRP;
Tsunakawa et al., IJCNN 2019). For each image it prints one line per detection and writes,
under OUT/<image name>/:

  detections.png     the image with every explained detection drawn (class, score)
  det<i>.png         detection i: the image with its box, then its class map and its box maps
                     over the image, in one panel (SSD, RetinaNet: cx, cy, w, h; FCOS: the
                     distances l, t, r, b and the centerness ctr; YOLO: l, t, r, b)
  det<i>_<map>.npy   with --save-maps: each map as float32 (H, W) on the original image

and OUT/detections.jsonl: one JSON line per explained detection (image, detection index, class,
score, box in original pixels, anchor index and head level, panel file), and OUT/manifest.json
(the files this run wrote). A re-run into the same OUT removes the files of the previous run it
did not write again (see `relprop explain --help`); OUT inside an input folder is not searched.

What the maps say (red = positive relevance, blue = negative):
  class   red: evidence for the detected class; blue: evidence for the other classes
          (contrastive, sums to zero; with --no-contrast plain LRP of the class logit, which
          sums to one)
  cx, cy  red: what pushes the box centre right (cx) / down (cy) from its default box;
          blue: what pushes it left / up
  w, h    red: what makes the box wider / taller; blue: narrower / shorter
  (FCOS: l, t, r, b the distances from the anchor point to the box's edges, ctr the centerness)
Box maps read that way only with --box-rule lrp0, whose maps pass the direction check (removing
the most positive pixels moves the output down, the most negative up) but do not conserve: biases
absorb their sum. The default (split, the seed's R+ - R-) and signed conserve, and their blue
side does not push the other way: read it as where the box head's evidence sits. Each panel says
which under its box maps (docs/crp.md).

Maps are computed in the detector's own input space (after its resize and normalization) and
resized onto the original image for display; so an image of more than 4096x4096 pixels
(16.8 megapixels) is refused on one line (scale it down first), as are files that are not
regular files and images whose detector output or maps are NaN or infinite. The other images go on.
"""

EPILOG = """\
examples:
  relprop detect photo.jpg --weights ../shared/models/ssd_resnet18_tin10.pt \\
      --model-def ../shared/models/ssd_resnet18_tin10.py:from_metadata --out detected
  relprop detect street.jpg --weights ssd300_vgg16_coco.pth --arch ssd300_vgg16 \\
      --num-classes 91 --score-threshold 0.4 --max-detections 3 --out street
  relprop detect img.jpg --weights det.pt --model-def det.py:from_metadata \\
      --target-class lemon --out what-if      # explain "lemon" for every detected box
  relprop detect street.jpg --arch fcos_resnet50_fpn --weights DEFAULT --out street
      # torchvision's COCO weights, from the torch hub cache (downloaded once unless --offline)
  relprop detect scene.png --weights fcos_scenes.pt --out scene
      # a checkpoint of benchmarks/train_detectors.py names its --arch itself

architectures (--arch; with --weights DEFAULT, COCO_V1 or a file):
@@DETECTOR_ARCHS@@

supported detectors:
  torchvision SSD, RetinaNet and FCOS whose backbone relprop can trace (Conv2d, BatchNorm and
  FrozenBatchNorm2d, ReLU, max/avg pool, residual adds, SSD300's L2Norm, the FPN's upsample +
  add with Relevance Splitting), SSDLite-MobileNetV3 included (Hardswish passes relevance
  through like ReLU; squeeze-excitation gates leave all relevance with the gated features).

exit status:
  0  every image was processed
  1  some inputs failed (each named on stderr), or a bad model or option
  2  bad usage (unknown option, missing argument)
  3  internal error (a bug: one line; rerun with --debug for the traceback)
"""



def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `relprop detect`."""
    parser = subparsers.add_parser(
        "detect",
        help="detect objects with an SSD, RetinaNet, FCOS or YOLOv8 and explain each detection's class and box (CRP)",
        description=DESCRIPTION,
        epilog=EPILOG.replace("@@DETECTOR_ARCHS@@", architecture_lines()),
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
    parser.add_argument("--box-rule", choices=tuple(BOX_RULES), default="split",
                        help="what a box map is (default: split, the seed's): "
                             + "; ".join(f"{name}: {rule.summary}" for name, rule in BOX_RULES.items()))
    parser.add_argument("--split", choices=("ratio", "symmetric", "signed"), default="ratio",
                        help="relevance split at residual adds (default: ratio, the paper's)")
    parser.add_argument("--save-maps", action="store_true",
                        help="also write every map as det<i>_<map>.npy")
    parser.add_argument("--out", default="detected", metavar="DIR",
                        help="output folder (created; default: ./detected)")
    parser.add_argument("--device", default="auto", metavar="DEV",
                        help="cpu, cuda, cuda:1, ... (default: auto, a GPU when there is one)")
    # No --resize/--crop/--mean/--std: a torchvision SSD resizes and normalizes inside the model.
    add_model_options(parser, preprocessing=False, arch_choices=DETECTOR_ARCHS)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Detect and explain every image; return 1 if any input failed, after all the others."""
    from relprop.models import load_detector  # deferred: keeps relprop --help fast
    from relprop.pipelines.detect import (  # deferred: keeps relprop --help fast
        DetectConfig,
        detect_images,
    )

    config = DetectConfig(
        inputs=tuple(args.inputs), out=Path(args.out), score_threshold=args.score_threshold,
        max_detections=args.max_detections, target=args.target_class,
        contrast=not args.no_contrast, include_background=args.include_background,
        box_contrast=args.box_contrast, split=args.split, box_rule=args.box_rule, save_maps=args.save_maps,
        device=resolve_device(args.device),
    )
    prepare_out(args.out)  # before the model loads: a bad --out fails at once
    classes, class_names = read_classes(args.classes)
    model, info = load_detector(args.weights, args.model_def, args.arch, args.num_classes,
                                classes=classes, class_names=class_names, offline=args.offline)
    threshold = config.score_threshold

    def print_image(path: Path, records: list[DetectionRecord]) -> None:
        from tqdm import tqdm  # deferred: keeps relprop --help fast

        for record in records:
            tqdm.write(_summary(record), file=sys.stdout)
        if not records:
            tqdm.write(f"{path}: no detection scores at least {threshold}", file=sys.stdout)

    summary = detect_images(config, model, info, on_image=print_image)
    if summary.failures:
        print(f"relprop detect: {len(summary.failures)} of {summary.inputs} inputs failed "
              "(named above)", file=sys.stderr)
        return 1
    return 0


def _summary(record: DetectionRecord) -> str:
    x0, y0, x1, y1 = record.box
    return (f"{record.image}: #{record.detection} {record.class_name} "
            f"{record.score:.1%} [{x0:.0f},{y0:.0f},{x1:.0f},{y1:.0f}] -> {record.panel}")
