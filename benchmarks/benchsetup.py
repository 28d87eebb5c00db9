"""Model and options shared by the baseline benchmarks (run from the repository root)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")


def setup_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str, torch.Tensor]:
    """The shared tin10 ResNet-18 where it fits the options (else random weights), on the device,
    and `args.images` random inputs."""
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = SHARED / "models" / "resnet18_tin10.pt"
    if args.arch == "resnet18" and args.size == 112 and checkpoint.is_file():
        from relprop.models import load_model

        model, _ = load_model(checkpoint)
        source = "resnet18_tin10.pt"
    else:
        torch.manual_seed(0)
        model, source = torchvision.models.get_model(args.arch).eval(), f"random {args.arch}"
    model = model.to(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.images, 3, args.size, args.size, device=args.device)
    return model, source, x
