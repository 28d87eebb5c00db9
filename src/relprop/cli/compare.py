"""`relprop compare`: every method against a baseline, paired over the images of an evaluate run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from relprop.cli.common import LazyChoices
from relprop.errors import InputError

DESCRIPTION = """\
Compare every method of a `relprop evaluate` output folder with a baseline method on the same
images: the mean paired difference (method - baseline) of a metric, its 95 % paired bootstrap
confidence interval (10,000 resamples of the images, seed 0) and the two-sided Wilcoxon
signed-rank p-value (scipy.stats.wilcoxon), one table per protocol. Printed and written to
OUT/compare.md. Reads the union of results.jsonl and results.rank<r>.jsonl (sharded runs).
"""

EPILOG = """\
examples:
  relprop compare runs/tin10 --baseline gradcam
  relprop compare runs/tin10 --baseline lrp-split-sym --metric insertion

exit status: 0 written; 1 not an evaluate folder, or the baseline was not evaluated; 2 bad usage.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `relprop compare`."""
    parser = subparsers.add_parser(
        "compare", help="paired differences vs a baseline method, with CI and Wilcoxon p",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("eval_out", metavar="OUT", help="the --out folder of `relprop evaluate`")
    parser.add_argument("--baseline", required=True, metavar="METHOD",
                        help="the reference method (a name or alias evaluated in OUT)")
    parser.add_argument("--metric", choices=LazyChoices("relprop.evaluation.metrics", "METRICS"),
                        default="id", metavar="METRIC",
                        help="the per-image score compared: %(choices)s (default id)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the comparison and write OUT/compare.md."""
    # deferred: keeps relprop --help fast (the evaluation imports torch)
    from relprop.evaluation.compare import compare_markdown, paired_differences
    from relprop.evaluation.results import (  # deferred: keeps relprop --help fast
        ReadCounts,
        load_rows,
        read_run_info,
        run_inputs,
        shard_files,
        write_atomic,
    )
    from relprop.methods import canonical_name  # deferred: keeps relprop --help fast

    out = Path(args.eval_out)
    if not shard_files(out, "results"):
        raise InputError(f"{out}: no results.jsonl here; is this the --out folder of `relprop evaluate`?")
    counts = ReadCounts()
    run = load_rows(out, canonical=canonical_name, inputs=run_inputs(read_run_info(out / "run.json")),
                    counts=counts)
    for note in counts.notes():
        print(f"relprop compare: {note}", file=sys.stderr)
    table = paired_differences(run.rows, args.baseline, args.metric)
    if not table:
        raise InputError(f"{out}: no image was scored by both {args.baseline} and another method")
    text = compare_markdown(table, args.baseline, args.metric)
    write_atomic(out / "compare.md", "".join(f"*{note}.*\n\n" for note in counts.notes()) + text)
    print(text, file=sys.stdout)
    return 0
