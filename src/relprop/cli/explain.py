"""`relprop explain`: heatmaps for a user's own images, as PNG overlays, raw maps and one panel."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from relprop.cli.common import (
    RegistryHelpFormatter,
    add_model_options,
    check_method_names,
    load_model_from_args,
)
from relprop.defaults import DEFAULT_WEIGHTS
from relprop.devices import resolve_device
from relprop.pipelines.outputs import prepare_out

if TYPE_CHECKING:
    from relprop.pipelines.explain import ExplainRecord

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
to 112 pixels high would be 186666 pixels wide), anything that is not a regular file (a FIFO or a
device named like an image is refused without being opened), float images with a NaN or infinite
pixel, and images for which the model's output or a method's map is NaN or infinite (never
shown as a percentage over an empty map). Output folders are named after the images with `.`,
`..`, slashes and control characters replaced, so they always lie inside OUT.

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
  3  internal error (a bug: one line; rerun with --debug for the traceback)
"""

DEFAULT_METHODS = "ours,gradcam,ig"  # relprop.pipelines.explain.DEFAULT_METHODS, as one option


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
    from relprop.pipelines.explain import (  # deferred: keeps relprop --help fast
        ExplainConfig,
        explain_images,
    )

    config = ExplainConfig(
        inputs=tuple(args.inputs), out=Path(args.out), methods=tuple(check_method_names(args.methods)),
        target=args.target, hq=args.hq, sign=args.sign, batch_size=args.batch_size,
        device=resolve_device(args.device), cam_layer=args.cam_layer,
    )
    prepare_out(args.out)  # before the model loads: a bad --out fails at once
    model, info = load_model_from_args(args, "explain")
    summary = explain_images(config, model, info, on_image=_print_image)
    if summary.capture_path == "concrete":
        print("relprop explain: torch.fx cannot trace this model symbolically; LRP captured it per input "
              "shape, each capture checked against the model's output", file=sys.stderr)
    if summary.removed:
        print(f"relprop explain: removed {len(summary.removed)} file(s) of the previous run in "
              f"{summary.out} that this run did not write again", file=sys.stderr)
    if summary.failures:
        print(f"relprop explain: {len(summary.failures)} of {summary.inputs} inputs failed "
              "(named above)", file=sys.stderr)
    if summary.failed_methods:
        print(f"relprop explain: method(s) {', '.join(summary.failed_methods)} could not run on "
              "this model (named above); the others ran", file=sys.stderr)
    return 0 if summary.ok else 1


def _print_image(record: ExplainRecord) -> None:
    """One line per image on stdout (through tqdm, under the progress bar)."""
    from tqdm import tqdm  # deferred: keeps relprop --help fast

    line = f"{record.image}: {record.pred_name} ({record.prob:.1%})"
    if record.target != record.pred:
        line += f", explaining {record.target_name} ({record.target_prob:.1%})"
    tqdm.write(f"{line} -> {record.output}/panel.png", file=sys.stdout)
