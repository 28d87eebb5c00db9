"""The `relprop` command: one sub-command per module in `relprop.cli`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from relprop import __version__
from relprop.errors import RelpropError

# Each module defines `add_parser(subparsers)` and `run(args) -> int`.
COMMANDS = ("explain", "evaluate", "compare", "report", "detect", "fit-bow")

DESCRIPTION = """\
relprop explains what image classifiers and detectors base their predictions on, by
Layer-wise Relevance Propagation with the conservation property (Relevance Splitting
for residual networks, Otsuki et al., ECCV 2024), next to the standard baselines
(Grad-CAM, Score-CAM, Integrated Gradients, Guided Backprop) and the standard
faithfulness metrics (Insertion, Deletion, ID score).
"""

EPILOG = """\
examples:
  relprop explain photo.jpg --weights resnet18_tin10.pt --methods ours,gradcam --out explained
  relprop evaluate --weights resnet18_tin10.pt --data tin10/val --per-class 2 --save-maps --out run
  relprop compare run --baseline gradcam
  relprop report run --out run-report
  relprop detect street.jpg --weights ssd.pt --model-def ssd.py:from_metadata --out detected

Run `relprop COMMAND --help` for the options of one command.
Exit status: 0 on success, 1 when some inputs failed (each named on stderr), 2 on bad usage.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relprop",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"relprop {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"relprop.cli.{name.replace('-', '_')}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)  # a command that starts itself again needs it
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except RelpropError as error:
        print(f"relprop {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"relprop {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
