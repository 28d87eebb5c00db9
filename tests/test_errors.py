"""Unsupported layers and untraceable models fail at construction with one clear line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from relprop import LRP
from relprop.errors import TraceError, UnsupportedLayerError


class WithSoftplus(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softplus())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class WithControlFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.gate(x).mean((2, 3)))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return x
        return -x


class WithSigmoidFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return torch.sigmoid(self.conv(x)).mean((2, 3))


def test_unsupported_module_is_named_with_the_fix():
    with pytest.raises(UnsupportedLayerError) as info:
        LRP(WithSoftplus())
    message = str(info.value)
    assert "'features.1' (Softplus)" in message and "rules={torch.nn.Softplus:" in message
    assert "\n" not in message


def test_untraceable_model_names_the_module():
    with pytest.raises(TraceError) as info:
        LRP(WithControlFlow())
    message = str(info.value)
    assert "in module 'gate' (Gate)" in message and "rules={" in message
    assert "\n" not in message


def test_unsupported_function_is_named():
    with pytest.raises(UnsupportedLayerError, match="function 'torch.sigmoid'"):
        LRP(WithSigmoidFunction())


def test_model_that_is_not_a_classifier_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 2, 3))
    with pytest.raises(Exception, match=r"\(N, num_classes\) outputs"):
        LRP(model).attribute(torch.randn(1, 3, 8, 8))
