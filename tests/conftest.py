"""Shared fixtures; the helpers that locate ../shared live in sharedfiles.py."""

from __future__ import annotations

import pytest
import torch

from sharedfiles import load_torchvision_checkpoint, shared_path

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def resnet18_tin10() -> torch.nn.Module:
    return load_torchvision_checkpoint(shared_path("models", "resnet18_tin10.pt"))


@pytest.fixture(scope="session")
def golden_resnet18() -> dict:
    return torch.load(shared_path("golden", "official_resnet18_tin10.pt"), weights_only=True)
