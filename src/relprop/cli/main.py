"""The `relprop` command: one sub-command per module in `relprop.cli`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from relprop import __version__
from relprop.cli.common import EXIT_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED
from relprop.errors import RelpropError, first_line

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

exit status:
  0    success
  1    some inputs failed (each named on stderr, the others were processed), or the run was
       refused on one line: a bad model, option, target, data or output folder, or a system
       error such as a full disk (the line names the file)
  2    bad usage (unknown option, missing argument)
  3    internal error: a bug in relprop (one line; rerun with --debug for the traceback)
  4    evaluate --launcher torchrun: a process of the sharded run died; rerun the same command
  130  interrupted (Ctrl-C)
No traceback is shown unless --debug is given or RELPROP_DEBUG=1 is set.
"""



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relprop",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"relprop {__version__}")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the traceback of an error (also: RELPROP_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        command = importlib.import_module(f"relprop.cli.{name.replace('-', '_')}").add_parser(subparsers)
        # also after the command's name; SUPPRESS keeps the global value when not given here
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error (also: RELPROP_DEBUG=1)")
    return parser


def debug_wanted(args: argparse.Namespace | None = None) -> bool:
    """--debug, or RELPROP_DEBUG set to anything but empty or 0."""
    return bool(getattr(args, "debug", False)) or os.environ.get("RELPROP_DEBUG", "") not in ("", "0")


def one_line(text: str) -> str:
    """An error message on one line, whatever it holds (a file name with a newline in it)."""
    return " ".join(text.replace("\r", "\n").split("\n")).strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)  # a command that starts itself again needs it
    if args.command is None:
        parser.print_help()
        return 2
    prefix = f"relprop {args.command}"
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # the last line of defence: no traceback reaches the user
        line, code = describe(error)
        if debug_wanted(args):
            traceback.print_exc(file=sys.stderr)
        elif code == EXIT_INTERNAL:
            line += " (rerun with --debug for the traceback)"
        print(f"{prefix}: {line}", file=sys.stderr)
        return code


def describe(error: Exception) -> tuple[str, int]:
    """(one line for stderr, exit status) of an error that ended a command."""
    if isinstance(error, RelpropError):
        return f"error: {one_line(str(error))}", EXIT_FAILED
    if isinstance(error, OSError):  # a full disk, a vanished folder, a read-only mount, ...
        reason = error.strerror or first_line(error)
        where = next((name for name in (error.filename, error.filename2) if name is not None), None)
        text = f"{where}: {reason}" if where is not None else reason
        return f"error: {one_line(str(text))}", EXIT_FAILED
    if isinstance(error, MemoryError):
        return "error: out of memory (MemoryError); use smaller inputs or batches", EXIT_FAILED
    return f"internal error: {type(error).__name__}: {one_line(first_line(error, default=''))}", \
        EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
