"""Helpers of the detection benchmarks (box_direction.py, scene_contrast.py), hand-computed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import box_direction  # noqa: E402
import scene_contrast  # noqa: E402


def test_wilson_interval_matches_the_textbook_value():
    low, high = box_direction.wilson(8, 10)  # p = 0.8, n = 10: Wilson 95 % = [0.490, 0.943]
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert all(v != v for v in box_direction.wilson(0, 0))  # NaN without trials


def test_box_share_counts_positive_mass_only_and_in_box_reads_the_maximum():
    heat = torch.zeros(10, 10)
    heat[2, 3] = 3.0  # inside (x 3, y 2)
    heat[8, 8] = 1.0  # outside
    heat[2, 4] = -5.0  # negative: not counted
    box = torch.tensor([2.0, 1.0, 6.0, 4.0])  # x0 y0 x1 y1, exclusive ends
    assert scene_contrast.box_share(heat, box) == pytest.approx(0.75)
    assert scene_contrast.in_box(heat, box)
    assert not scene_contrast.in_box(heat, torch.tensor([5.0, 5.0, 10.0, 10.0]))
    assert scene_contrast.box_share(-heat.abs(), box) != scene_contrast.box_share(-heat.abs(), box)  # NaN
