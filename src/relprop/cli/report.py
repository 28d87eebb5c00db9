"""`relprop report`: an evaluate run as an offline HTML report to look at and share."""

from __future__ import annotations

import argparse
import sys

from relprop.errors import InputError

DESCRIPTION = """\
Turn the output folder of `relprop evaluate` into a report folder: REPORT_DIR/index.html and
the picture files it shows. The page works offline (nothing is loaded from the network), so the
folder can be zipped, mailed or put on any web server as it is.

The report shows:
  - the run's provenance (run.json) and the summary table: mean ± std of insertion, deletion,
    ID score, localization and conservation error per method and protocol; click a column
    heading to sort; it fits a 1400 px wide window without scrolling;
  - the images evaluate skipped (skipped.jsonl), each with its reason;
  - the mean insertion and deletion curves of every method;
  - conservation: relevance summed at the last and the first residual block and at the input,
    against the explained output, one point per image, with the diagonal of exact conservation;
  - a gallery, page by page: each image as the model saw it, each method's map over it, and
    the image's ID score per method; it can be sorted by the ID score of any method.
The maps come from `relprop evaluate --save-maps`; without them the gallery shows the scores
and says how to get the maps: the same evaluate command again with --save-maps into the same
--out writes the maps of the images already scored, without scoring them again. The original images are read from the evaluation's --data folder
(recorded in run.json), or from --data.
"""

EPILOG = """\
examples:
  relprop evaluate --weights ../shared/models/resnet18_tin10.pt --data ../shared/data/tin10/val \\
      --methods ours,gradcam --save-maps --out runs/tin10
  relprop report runs/tin10 --out runs/tin10-report
  relprop report runs/tin10 --out /tmp/report --data /mnt/copy-of-val --page-size 50

exit status:
  0  the report was written
  1  EVAL_OUT is not an evaluate output folder (no results.jsonl) or cannot be read
  2  bad usage (unknown option, missing argument)
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `relprop report`."""
    parser = subparsers.add_parser(
        "report",
        help="offline HTML report of an evaluate run (table, curves, conservation, gallery)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("eval_out", metavar="EVAL_OUT", help="the --out folder of `relprop evaluate`")
    parser.add_argument("--out", required=True, metavar="REPORT_DIR",
                        help="folder to write index.html and its pictures to (created)")
    parser.add_argument("--data", metavar="DIR",
                        help="where the evaluated images are (default: the --data recorded in run.json)")
    parser.add_argument("--sign", choices=("all", "positive"), default="all",
                        help="all: signed maps, red positive / blue negative (default); "
                             "positive: only positive relevance")
    parser.add_argument("--page-size", type=int, default=20, metavar="N",
                        help="gallery images per page (default: 20)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the report and print where it is."""
    from relprop.pipelines.outputs import prepare_out  # deferred: keeps relprop --help fast
    from relprop.report import build_report  # deferred: keeps relprop --help fast

    if args.page_size < 1:
        raise InputError(f"--page-size {args.page_size}: must be at least 1")
    prepare_out(args.out)
    index = build_report(args.eval_out, args.out, data=args.data, sign=args.sign,
                         page_size=args.page_size)
    print(f"report written: {index}", file=sys.stdout)
    return 0
