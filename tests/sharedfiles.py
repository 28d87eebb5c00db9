"""Access to the read-only data, models and golden files in ../shared, for tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

def shared_path(*parts: str) -> Path:
    """A path under ../shared, or a skip (with the reason) where the folder is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available (the shared data folder sits beside the repository)")
    return path


def load_torchvision_checkpoint(path: Path) -> torch.nn.Module:
    """A torchvision classifier from a shared checkpoint (fp16 weights cast to fp32), in eval mode."""
    import torchvision

    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    model = torchvision.models.get_model(checkpoint.get("arch", "resnet50"),
                                         num_classes=checkpoint.get("num_classes", 1000))
    model.load_state_dict({key: value.float() for key, value in state.items()})
    return model.eval()


def copy_tin10_val(root: Path, images: dict[str, list[str]], boxes: bool = True) -> Path:
    """A small tin10-layout folder under `root`: the named val images of each class (wnid), with
    their lines of boxes.txt when `boxes`."""
    source = shared_path("data", "tin10", "val")
    for wnid, names in images.items():
        (root / wnid).mkdir()
        for name in names:
            (root / wnid / name).write_bytes((source / wnid / name).read_bytes())
        if boxes:
            lines = [line for line in (source / wnid / "boxes.txt").read_text().splitlines()
                     if line.split()[0] in names]
            (root / wnid / "boxes.txt").write_text("\n".join(lines) + "\n")
    return root
