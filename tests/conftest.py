"""Shared fixtures; the helpers that locate ../shared live in sharedfiles.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

from sharedfiles import load_torchvision_checkpoint, shared_path

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# Property tests draw the same examples on every run and machine: a CI failure replays here, and a
# tolerance is judged on a fixed sample rather than on whatever a new run happens to draw.
settings.register_profile("relprop", derandomize=True, database=None)
settings.load_profile("relprop")


@pytest.fixture(scope="session")
def resnet18_tin10() -> torch.nn.Module:
    return load_torchvision_checkpoint(shared_path("models", "resnet18_tin10.pt"))


@pytest.fixture(scope="session")
def golden_resnet18() -> dict:
    return torch.load(shared_path("golden", "official_resnet18_tin10.pt"), weights_only=True)


@pytest.fixture(scope="session")
def imagenet_torch_home(tmp_path_factory) -> tuple:
    """A TORCH_HOME whose hub cache holds a random-weight ResNet-50 (fp16, ~50 MB) under the file
    names of torchvision's IMAGENET1K_V1 and _V2 weights: the real loading path, offline.

    Returns (torch_home, state_dict as loaded in fp32)."""
    import os

    import torchvision

    home = tmp_path_factory.mktemp("torch_home")
    folder = home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    state = {k: v.half() if v.is_floating_point() else v
             for k, v in torchvision.models.resnet50().state_dict().items()}
    first = folder / "resnet50-0676ba61.pth"  # ResNet50_Weights.IMAGENET1K_V1
    torch.save(state, first)
    os.link(first, folder / "resnet50-11ad3fa6.pth")  # IMAGENET1K_V2, same bytes
    return home, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
