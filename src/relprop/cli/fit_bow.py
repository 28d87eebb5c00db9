"""`relprop fit-bow`: fit a bag-of-words kernel classifier on a class-folder tree (relprop.bow)."""

from __future__ import annotations

import argparse

from relprop.cli.common import LazyChoices
from relprop.pipelines.outputs import prepare_out_file

DESCRIPTION = """\
Fit the classifier family that LRP was first defined for (Bach et al., PLOS ONE 2015, sec. 3):
dense SIFT on a grid of patches -> k-means visual words (MiniBatchKMeans) -> hard or soft
(kernel-codebook) mapping -> p-means pooling -> one-vs-rest SVM (scikit-learn SVC, precomputed
kernel). DATA holds one folder per class (ImageFolder / tin10 layout). The model is written to
--out in relprop's pickle-free format (.bow.npz, see docs/bow.md); explain and evaluate it with
`relprop explain|evaluate --weights MODEL.bow.npz --methods bow-lrp,bow-lrp+hq,bow-occlusion`.
"""

EPILOG = """\
kernels: linear, intersection, chi2 (additive, 2xy/(x+y)) are decomposed exactly;
         rbf, exp-chi2 by a first-order Taylor expansion at a root point (residual reported)

examples:
  relprop fit-bow ../shared/data/tin10/train --val ../shared/data/tin10/val --out /tmp/tin10.bow.npz
  relprop fit-bow photos/ --words 100 --mapping soft --p inf --kernel rbf --out max.bow.npz

Images are bounded as in explain: --size at most 448 (448x448 = 200,704 pixels), and an image more
than 8 times as long as wide is skipped with one line. DATA needs two or more class folders,
each with a readable image; --out is checked before the fit, and written whole or not at all.

exit status: 0 fitted and saved; 1 bad data or options (one line on stderr); 2 bad usage;
3 internal error (rerun with --debug for the traceback).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `relprop fit-bow`."""
    parser = subparsers.add_parser(
        "fit-bow", help="fit a bag-of-words SVM (dense SIFT, k-means, pooling) to explain with bow-lrp",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", metavar="DATA", help="training images, one folder per class")
    parser.add_argument("--out", required=True, metavar="MODEL.bow.npz", help="where to save the model")
    parser.add_argument("--val", metavar="DIR", help="labelled folder to report the accuracy on")
    parser.add_argument("--per-class", type=int, metavar="N", help="first N training images per class")
    parser.add_argument("--size", type=int, default=64, help="shorter image side in pixels (default 64)")
    parser.add_argument("--patch", type=int, default=16, help="patch size in pixels (default 16)")
    parser.add_argument("--stride", type=int, default=8, help="grid stride in pixels (default 8)")
    parser.add_argument("--colour", action="store_true", help="add colour mean/std to each SIFT descriptor")
    parser.add_argument("--words", type=int, default=200, help="codebook size V (default 200)")
    parser.add_argument("--mapping", choices=("hard", "soft"), default="hard", help="default hard")
    parser.add_argument("--sigma", type=float, help="soft mapping width (default: median nearest-word distance)")
    parser.add_argument("--p", type=float, default=1.0, help="p-means pooling, >= 1 or inf (default 1)")
    parser.add_argument("--norm", choices=("none", "l1", "l2"), default="l1", help="default l1")
    parser.add_argument("--kernel", choices=LazyChoices("relprop.bow.kernels", "KERNELS"), default="chi2",
                        metavar="KERNEL", help="%(choices)s (default chi2)")
    parser.add_argument("--C", type=float, default=1.0, help="SVM C (default 1)")
    parser.add_argument("--gamma", type=float, help="rbf / exp-chi2 width (default: 1 / mean distance)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    # deferred: keeps relprop --help fast (scikit-learn, OpenCV, torch)
    from relprop.bow.pipeline import BoWConfig, fit
    from relprop.bow.storage import save

    prepare_out_file(args.out)  # before the fit: a bad --out fails at once, not after minutes
    config = BoWConfig(patch=args.patch, stride=args.stride, colour=args.colour, words=args.words,
                       mapping=args.mapping, sigma=args.sigma, p=args.p, norm=args.norm,
                       kernel=args.kernel, C=args.C, gamma=args.gamma, size=args.size, seed=args.seed)
    pipeline = fit(args.data, config, per_class=args.per_class, val_folder=args.val)
    path = save(pipeline, args.out)
    print(f"relprop fit-bow: saved {path}")
    return 0
