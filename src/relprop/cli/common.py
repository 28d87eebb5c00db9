"""Pieces the image commands share: the model options, which images to process, where outputs
go, which device."""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relprop.errors import RelpropError

if TYPE_CHECKING:
    from relprop.modelinfo import ModelInfo

# Exit statuses of every command (`relprop --help` lists them).
EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_RANK_DIED, EXIT_INTERRUPTED = 1, 2, 3, 4, 130

METHODS_PLACEHOLDER = "@@METHODS@@"


def method_list(indent: str = "  ") -> str:
    """The registry's method names (and aliases), wrapped, for an epilog: never copied by hand."""
    from relprop.methods import HQ_SUFFIX, method_names  # deferred: keeps relprop --help fast

    names = method_names()
    aliases = [a for a in method_names(include_aliases=True) if a not in names]
    lines = textwrap.wrap(", ".join(names), width=92, initial_indent=indent, subsequent_indent=indent,
                          break_on_hyphens=False)  # a name split at its hyphen is no name
    if aliases:
        lines += textwrap.wrap("aliases: " + ", ".join(aliases), width=92, initial_indent=indent,
                               subsequent_indent=indent + "  ")
    lines.append(f'{indent}any name + "{HQ_SUFFIX}": its map with Heat Quantization (8 levels)')
    return "\n".join(lines)


class RegistryHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Raw description and epilog, with @@METHODS@@ (and @@DETECTION_METHODS@@) filled from the
    registries when the help
    is printed (so `relprop --help` does not import torch, and no list is copied by hand)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if METHODS_PLACEHOLDER in text:
            text = text.replace(METHODS_PLACEHOLDER, method_list())
        if "@@DETECTION_METHODS@@" in text:
            from relprop.evaluation.detection import METHODS  # deferred: keeps relprop --help fast

            text = text.replace("@@DETECTION_METHODS@@", ", ".join(METHODS))
        return super()._fill_text(text, width, indent)


class LazyChoices:
    """argparse `choices` read from a library registry when first needed (a value is checked or a
    command's help is printed), so building the parser, and `relprop --help`, imports no torch.
    Give the argument a `metavar` (argparse lists the choices in the usage line otherwise, which
    it builds when the argument is added) and name them in the help by `%(choices)s`."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(importlib.import_module(self.module), self.name))

    def __contains__(self, value: object) -> bool:
        return value in self._values()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values())

    def __len__(self) -> int:
        return len(self._values())


def check_method_names(text: str) -> list[str]:
    """`--methods` split and checked against the registry before anything is loaded (see
    `relprop.methods.requested_methods`)."""
    from relprop.methods import requested_methods  # deferred: keeps relprop --help fast

    return requested_methods(text.split(","))


MODEL_OPTIONS_HELP = """\
--weights takes a relprop checkpoint (it carries the architecture, classes and preprocessing), a
plain state dict (with --arch; preprocessing from the options below, or a stated assumption), or a
torchvision weights name such as ResNet50_Weights.IMAGENET1K_V2, or IMAGENET1K_V1 / DEFAULT with
--arch. Named weights come with their own preprocessing and class names; their file is read from
the torch hub cache ($TORCH_HOME/hub/checkpoints) and downloaded there on first use, with a
progress bar, unless --offline."""


def add_model_options(parser: Any, *, default_weights: str | None = None, several: bool = False,
                      preprocessing: bool = True, arch_choices: Sequence[str] | None = None) -> None:
    """The model options `explain`, `evaluate` and `detect` share, in one argument group."""
    group = parser.add_argument_group("model", MODEL_OPTIONS_HELP)
    default = f" (default: {default_weights})" if default_weights else ""
    group.add_argument("--weights", nargs="+" if several else None, required=default_weights is None,
                       metavar="CKPT", help="weights file or torchvision weights name"
                       + ("; several: mean and std over them, e.g. seeds" if several else "") + default
                       + ("; with only --arch: that architecture's DEFAULT weights" if default else ""))
    parser.set_defaults(default_weights=default_weights)
    group.add_argument("--arch", metavar="NAME", choices=arch_choices,
                       help="architecture of a plain state dict (torchvision's, or timm's: convnext_atto, "
                            "timm/efficientnet_b0) or of IMAGENET1K_V1/DEFAULT (e.g. resnet50); "
                            "hf/<folder or hub id>: a Hugging Face image classifier with its weights "
                            "and image processor (pip install 'relprop[hf]')"
                       if arch_choices is None else
                            f"detector to build (for a plain state dict or DEFAULT/COCO_V1 weights): {', '.join(arch_choices)}")
    group.add_argument("--num-classes", type=int, metavar="N",
                       help="classes of a plain state dict (default: read from the weights)")
    group.add_argument("--model-def", metavar="FILE.py:FUNCTION",
                       help="build the model with FUNCTION(metadata) from FILE.py (models torchvision lacks)")
    group.add_argument("--classes", metavar="FILE",
                       help="class ids of a plain state dict, in index order: a file with one "
                            "'ID' or 'ID<TAB>NAME' line each, or 'imagenet' (torchvision's 1,000 wnids)")
    if preprocessing:
        group.add_argument("--resize", type=int, metavar="PX",
                           help="Resize: the shorter side in pixels (plain state dict default 256)")
        group.add_argument("--crop", type=int, metavar="PX",
                           help="CenterCrop size; 0: no crop (plain state dict default 224)")
        group.add_argument("--mean", type=float, nargs=3, metavar="M",
                           help="Normalize mean, R G B (default: ImageNet's)")
        group.add_argument("--std", type=float, nargs=3, metavar="S",
                           help="Normalize std, R G B (default: ImageNet's)")
    group.add_argument("--offline", action="store_true",
                       help="never download weights: a named weights file must already be in the cache")


def load_model_from_args(args: Any, command: str, *, weights: str | None = None,
                         model_def: str | None = None) -> tuple[Any, ModelInfo]:
    """The model and its `ModelInfo` (preprocessing included) from the shared model options.

    Prints on stderr which torchvision weights are used, or which preprocessing was assumed for a
    plain state dict that does not say.
    """
    from relprop.models import (  # deferred: keeps relprop --help fast
        describe_preprocessing,
        load_model,
    )

    if weights is None and args.weights is None:
        if model_def or args.model_def:
            raise RelpropError("--model-def needs --weights FILE")
        weights = "DEFAULT" if args.arch else args.default_weights
    classes, names = read_classes(args.classes)
    model, info = load_model(
        weights if weights is not None else args.weights, arch=args.arch,
        num_classes=args.num_classes, model_def=model_def or args.model_def,
        resize=getattr(args, "resize", None), crop=getattr(args, "crop", None),
        mean=getattr(args, "mean", None), std=getattr(args, "std", None),
        classes=classes, class_names=names, offline=args.offline,
    )
    assert info.source is not None  # load_model always says where the weights came from
    if info.source.name:
        library = "Hugging Face" if info.arch == info.source.name else f"torchvision {info.arch} with"
        print(f"relprop {command}: model: {library} {info.source.name} "
              f"({describe_preprocessing(info)})", file=sys.stderr)
    elif info.assumed and hasattr(args, "resize"):
        given = ", ".join(f"--{k}" for k in info.assumed)
        print(f"relprop {command}: note: {info.source.path} does not say how to preprocess; assumed "
              f"{describe_preprocessing(info)} (set {given} to change it)", file=sys.stderr)
    return model, info


def read_classes(text: str | None) -> tuple[list[str] | None, list[str] | None]:
    """`--classes`: `imagenet`, or a file of `ID` / `ID<TAB>NAMES` lines (`#` comments skipped).

    Returns the ids and the readable names (the first of comma-separated names), None if absent.
    """
    if text is None:
        return None, None
    if text == "imagenet":
        from relprop.models import imagenet_classes  # deferred: keeps relprop --help fast

        rows = [(wnid, lemmas) for wnid, lemmas in imagenet_classes()]
        return [r[0] for r in rows], [r[1].split(",")[0].strip() for r in rows]
    if Path(text).exists() and not Path(text).is_file():  # a FIFO would block the read forever
        raise RelpropError(f"--classes {text}: not a regular file")
    try:
        lines = Path(text).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise RelpropError(f"--classes {text}: cannot read it ({error.__class__.__name__})") from None
    rows = [line.split("\t", 1) for line in lines if line.strip() and not line.startswith("#")]
    if not rows:
        raise RelpropError(f"--classes {text}: no class ids in it (one 'ID' or 'ID<TAB>NAME' a line)")
    names = [row[1].split(",")[0].strip() if len(row) > 1 else None for row in rows]
    return [row[0].strip() for row in rows], (names if all(names) else None)
