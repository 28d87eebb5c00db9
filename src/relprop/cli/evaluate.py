"""`relprop evaluate`: the paper's faithfulness tables for your own model and data, one command.

Only the command line lives here (so `relprop --help` stays fast); the work is in
`relprop.evaluation.classification`.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from relprop.cli.common import (
    EXIT_RANK_DIED,
    RegistryHelpFormatter,
    add_model_options,
    load_model_from_args,
    read_classes,
)
from relprop.defaults import MIN_FRAME_BATCH, PAPER_WEIGHTS
from relprop.devices import resolve_device
from relprop.errors import InputError, RelpropError
from relprop.evaluation.protocols import DEFAULT_SEED, DEFAULT_TIES, PROTOCOLS, TIES, help_lines

DESCRIPTION = """\
Compare explanation methods on a labelled image folder by Insertion, Deletion and ID score
(Insertion - Deletion), in the paper's protocol, RISE's or ROAD's, plus localization where the data has
boxes and conservation for relprop's LRP methods. Without --weights it evaluates the paper's
ImageNet model (torchvision's ResNet50_Weights.IMAGENET1K_V1, Resize 256 -> CenterCrop 224).

Data layouts: class folders (ImageFolder; ImageNet's val/<wnid>/), the tin10 layout (class folders
with boxes.txt), ImageNet's flat val folder (ILSVRC2012_val_*.JPEG with Kaggle's
LOC_val_solution.csv in it or a parent), a flat folder of files named <wnid>_*.JPEG, and
CUB_200_2011 (test split, with its bounding boxes). Labels come from the model's own classes,
matched by the folder's name (class id such as a wnid, or class name); images of classes the model
does not have are left out and listed, and data with none of its classes is refused.

Writes under OUT:

  results.jsonl   one JSON line per (checkpoint, image, method, protocol; its "ties" and
                  "seed" recorded, a resume with others refused), appended as it goes:
                  a killed run resumes where it stopped (same command, same OUT); sharded runs
                  write results.rank<r>.jsonl, one per process, and everything reads the union,
                  each key once; a row whose model output, map or score is NaN/Inf is recorded
                  with its "failure" and no numbers (in no mean and no n)
  run.json        provenance: versions, checkpoint hashes, data, protocol parameters, and the
                  images (name, size, time): a resume on other images is refused unless --extend
  evaluate.lock   held (flock) while a run writes OUT: a second run on it is refused on one line
  summary.json    {method: {insertion, deletion, id, n, ...}} (mean and std over images; over
                  per-checkpoint means when several --weights are given)
  summary.md      the paper's table layout, then mean, standard error and 95 % bootstrap CI per
                  method (and with --baseline the paired differences, CI and Wilcoxon p);
                  curves_<protocol>.png: mean curves
  skipped.jsonl   unreadable images, one line each (also named on stderr)
  maps/<method>/<image stem>.npy   with --save-maps: each 2-D map exactly as ranked
"""

EPILOG_TEMPLATE = """\
protocols (never compare numbers across them; rows and summaries record the tie mode and seed):
@@PROTOCOLS@@

methods:
@@METHODS@@
  --task detection: @@DETECTION_METHODS@@

examples:
  relprop evaluate --data imagenet/val --per-class 1 --out runs/imagenet   # the paper's setting
  relprop evaluate --weights ../shared/models/resnet18_tin10.pt --data ../shared/data/tin10/val \\
      --methods ours,ours+hq,gradcam,scorecam --out runs/tin10 --protocol paper,rise
  relprop evaluate --weights seed*.pt --data CUB_200_2011 --per-class 5 --out runs/cub
  relprop evaluate --weights r50.pth --arch resnet50 --data imagenet/val --per-class 1 --out runs/in

sharding (torch.distributed; gloo on the CPU, nccl on GPUs, one GPU per local rank):
  torchrun --nproc-per-node 8 -m relprop evaluate --device cuda --data imagenet/val --out run
  relprop evaluate --launcher torchrun --nproc-per-node 2 --data tin10/val --out run ...
  The sorted images are cut into fixed batches of --batch-size, dealt to the ranks in turn; each
  rank appends to OUT/results.rank<r>.jsonl. Rerunning the same command resumes, with any number
  of processes: finished rows are neither redone nor lost. A rank that dies loses only the batch
  in progress; the job names the rank and the command to rerun.

exit status: 0 done; 1 some images unreadable (skipped and recorded), rows failed (NaN/Inf),
a bad model/method, or an error (one line: a full disk, OUT in use, ...); 2 bad usage;
3 internal error; 4 a process of a sharded run died (--launcher torchrun): rerun the same
command to resume; 130 interrupted. Every file is written whole or appended line by line, so after any of these
the same command resumes without losing or doubling a row.
"""

EPILOG = EPILOG_TEMPLATE.replace("@@PROTOCOLS@@", help_lines())  # from the registry, no torch

OUTCOME_ENV = "RELPROP_LAUNCH_OUTCOME"  # set by --launcher: the file rank 0 writes its status to

DEFAULT_METHODS = "ours,gradcam,scorecam,ig,gbp,lrp-captum"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `relprop evaluate`."""
    parser = subparsers.add_parser(
        "evaluate", help="Insertion/Deletion/ID, localization and conservation tables",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=RegistryHelpFormatter,
    )
    parser.add_argument("--data", required=True, metavar="DIR", help="labelled image folder")
    parser.add_argument("--methods", help=f"comma list, see below (default {DEFAULT_METHODS}; "
                                          "--task detection: all of its methods)")
    parser.add_argument("--out", required=True, metavar="OUT", help="output folder (resumable)")
    parser.add_argument("--protocol", default="paper",
                        help=f"comma list of {', '.join(PROTOCOLS)} (default paper)")
    parser.add_argument("--ties", choices=TIES, default=DEFAULT_TIES,
                        help=f"how tied map values are ordered (default {DEFAULT_TIES}; see below)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, metavar="N",
                        help=f"seed of --ties random and of ROAD's noise, drawn per image "
                             f"(default {DEFAULT_SEED}); recorded in every row")
    parser.add_argument("--channels", choices=("sum", "channel0"), default="sum",
                        help="3-channel baseline maps to 2-D: signed sum (default) or channel 0 only "
                             "(the reference code's quirk); relprop's LRP maps are always summed")
    parser.add_argument("--step", type=int, help="pixels per frame (default: 500 paper, image width rise)")
    parser.add_argument("--block", type=int, default=1, help="paper protocol: rank block x block patches")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate at most N images (N >= 1)")
    parser.add_argument("--per-class", type=int, metavar="N",
                        help="the first N images of each class (the paper: 1 on ImageNet, 5 on CUB)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B",
                        help="images explained at once (default 32); metric frames go "
                             f"max(B, {MIN_FRAME_BATCH}) per forward")
    parser.add_argument("--device", default="auto", metavar="DEV",
                        help="cpu, cuda, cuda:1, mps, ... (default: auto, a GPU when there is one)")
    parser.add_argument("--cam-layer", metavar="NAME",
                        help="module of Grad-CAM and Score-CAM, e.g. layer4.1 or features.29 "
                             "(default: layer4[-1] of a ResNet, else the last feature map the top "
                             "logit depends on; ViT tokens laid on their grid)")
    parser.add_argument("--task", choices=("classification", "detection"), default="classification",
                        help="detection: evaluate an SSD detector's explanations "
                             "(relprop.evaluation.detection; one --weights, with --model-def)")
    parser.add_argument("--save-maps", action="store_true", help="write OUT/maps/<method>/<stem>.npy")
    parser.add_argument("--extend", action="store_true",
                        help="resume on other images (--data, --limit, --per-class or the files "
                             "changed): the run takes the new image set; rows of removed or "
                             "replaced images count no more")
    parser.add_argument("--baseline", metavar="METHOD",
                        help="summary.md also compares every method with this one, paired over "
                             "images (as `relprop compare OUT --baseline METHOD`)")
    parser.add_argument("--launcher", choices=("none", "torchrun"), default="none",
                        help="torchrun: start --nproc-per-node processes of this command with "
                             "torch.distributed (the same as `torchrun -m relprop evaluate ...`)")
    parser.add_argument("--nproc-per-node", type=int, default=2, metavar="N",
                        help="processes for --launcher torchrun (default 2; one per GPU on a GPU node)")
    add_model_options(parser, default_weights=PAPER_WEIGHTS, several=True)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Parse into a typed config, load the model(s), call the library, report the outcome."""
    if args.launcher == "torchrun":
        return _launch(args)
    if args.task == "detection":
        return _run_detection(args, resolve_device(args.device))
    outcome = os.environ.get(OUTCOME_ENV)
    if outcome is None:
        return _run_classification(args)
    _die_with_parent(signal.SIGKILL)  # a rank of --launcher: never outlive torchrun
    try:
        code = _run_classification(args)
    except RelpropError:
        Path(outcome).write_text("1")  # an error said on one line: no "rank died" after it
        raise
    if code != 0 or os.environ.get("RANK", "0") == "0":
        Path(outcome).write_text(str(code))
    return 0  # the status goes through the file: torchrun reports no failure for skipped images


def _run_classification(args: argparse.Namespace) -> int:
    """Parse into a typed config, load the model(s), evaluate, report the outcome."""
    # deferred: keeps relprop --help fast (the evaluation imports torch)
    from relprop.evaluation.classification import Checkpoint, EvalConfig, evaluate, make_plan
    from relprop.evaluation.distributed import Ranks  # deferred: keeps relprop --help fast
    from relprop.pipelines.outputs import prepare_out  # deferred: keeps relprop --help fast

    Ranks.from_env()  # leftover torchrun variables: one line before any model loads

    config = EvalConfig(
        data=Path(args.data), out=Path(args.out), methods=tuple(_split(args.methods or DEFAULT_METHODS)),
        protocols=tuple(_split(args.protocol)), channels=args.channels, step=args.step,
        block=args.block, limit=args.limit, per_class=args.per_class, batch_size=args.batch_size,
        device=resolve_device(args.device), cam_layer=args.cam_layer, save_maps=args.save_maps,
        baseline=args.baseline, extend=args.extend, ties=args.ties, seed=args.seed,
    )
    make_plan(config.methods, config.protocols)  # a bad name fails before any model loads
    created = not Path(args.out).exists()
    prepare_out(args.out)
    try:
        checkpoints = [Checkpoint.of(*load_model_from_args(args, "evaluate", weights=path), given=path)
                       for path in args.weights or [None]]
        outcome = evaluate(config, checkpoints)
    except RelpropError:
        _remove_if_empty(Path(args.out), created)
        raise
    if not outcome.primary:  # rank 0 of a sharded run reports for the job
        return 0
    out = outcome.out
    print(f"relprop evaluate: {outcome.results} results in {out}/results*.jsonl; "
          f"summary in {out / 'summary.md'}", file=sys.stderr)
    if outcome.skipped:
        print(f"relprop evaluate: {outcome.skipped} unreadable image(s) skipped, listed in "
              f"{out / 'skipped.jsonl'}", file=sys.stderr)
    if outcome.failed_methods:
        print(f"relprop evaluate: method(s) {', '.join(outcome.failed_methods)} could not "
              "run (named above); the others were evaluated", file=sys.stderr)
    return 1 if outcome.skipped or outcome.failed_methods or outcome.failed_rows else 0


def _remove_if_empty(out: Path, created: bool) -> None:
    """A run refused before it wrote anything (bad --data, bad weights) leaves no --out behind."""
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _run_detection(args: argparse.Namespace, device: Any) -> int:
    """`--task detection`: one detector, its config, the tables on stdout."""
    # deferred: keeps relprop --help fast (the evaluation imports torch)
    from relprop.evaluation.detection import (
        METHODS,
        STEP,
        DetectionEvalConfig,
        check_methods,
        evaluate_detection,
        summary_markdown,
    )
    from relprop.models import load_detector  # deferred: keeps relprop --help fast
    from relprop.pipelines.outputs import prepare_out  # deferred: keeps relprop --help fast

    weights = args.weights or []
    if len(weights) != 1:
        raise InputError("--task detection evaluates one detector: give one --weights file")
    for option, value in (("--step", args.step), ("--limit", args.limit), ("--per-class", args.per_class)):
        if value is not None and value < 1:
            raise InputError(f"{option} {value}: must be at least 1")
    command = "relprop " + " ".join(sys.argv[1:])
    config = DetectionEvalConfig(
        data=Path(args.data), out=prepare_out(args.out), per_class=args.per_class, limit=args.limit,
        methods=check_methods(_split(args.methods)) if args.methods else METHODS,
        step=args.step or STEP, command=command,
    )
    classes, names = read_classes(args.classes)
    model, info = load_detector(weights[0], args.model_def, args.arch, args.num_classes,
                                classes=classes, class_names=names, offline=args.offline)
    summary = evaluate_detection(model.to(device), info.classes, config)
    print(summary_markdown(summary, command))
    return 0


def _launch(args: argparse.Namespace) -> int:
    """`--launcher torchrun`: this same command under torchrun, minus the launcher options."""
    if args.nproc_per_node < 1:
        raise InputError(f"--nproc-per-node {args.nproc_per_node}: must be at least 1")
    if args.task != "classification":
        raise InputError("--launcher torchrun shards classification only (--task detection runs "
                         "one process)")
    argv = _without_launcher(sys.argv[1:] if args.argv is None else args.argv)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc_per_node}", "-m", "relprop", *argv]
    handle, name = tempfile.mkstemp(prefix="relprop-outcome-")
    os.close(handle)
    try:
        code = subprocess.call(command, env={**os.environ, OUTCOME_ENV: name},
                               preexec_fn=lambda: _die_with_parent(signal.SIGTERM))
        status = Path(name).read_text().strip()
    finally:
        Path(name).unlink(missing_ok=True)
    if status.isdigit():  # rank 0 finished (or a rank said its error): its status is the job's
        return int(status)
    print(f"relprop evaluate: a process of the sharded run died (torchrun exit {code}; it named "
          "the rank above); finished rows are kept: rerun the same command, with any "
          "--nproc-per-node, to resume", file=sys.stderr)
    return EXIT_RANK_DIED


def _die_with_parent(sig: int) -> None:
    """Linux: this process gets `sig` when its parent dies (PR_SET_PDEATHSIG), so killing the
    launcher, even with kill -9, leaves no torchrun or rank running; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # deferred: only the launcher and its ranks need prctl

    ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # 1: PR_SET_PDEATHSIG


def _without_launcher(argv: list[str]) -> list[str]:
    """The command line without --launcher/--nproc-per-node (either `--opt v` or `--opt=v`)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--launcher", "--nproc-per-node"):
            skip = "=" not in arg
            continue
        kept.append(arg)
    return kept


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]
