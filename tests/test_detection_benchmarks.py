"""Helpers of the detection benchmarks (box_direction.py), hand-computed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import box_direction  # noqa: E402


def test_wilson_interval_matches_the_textbook_value():
    low, high = box_direction.wilson(8, 10)  # p = 0.8, n = 10: Wilson 95 % = [0.490, 0.943]
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert all(v != v for v in box_direction.wilson(0, 0))  # NaN without trials


def test_the_direction_table_has_a_row_per_side_and_the_random_baseline():
    rates = {"split": {o: {"positive": 0.8, "negative": 0.25, "random": 0.5,
                           "positive_ci": box_direction.wilson(8, 10), "negative_ci": (0.1, 0.5)}
                       for o in ("cx", "cy")}}
    table = box_direction.markdown({"detector": "d", "detections": 10, "rates": rates}).splitlines()
    assert table[2] == "| candidate | cx | cy |"
    assert table[4] == "| split + | 80 % [49, 94] | 80 % [49, 94] |"
    assert table[5] == "| split − | 25 % [10, 50] | 25 % [10, 50] |"
    assert table[6] == "| random 10 % removed: lower | 50 % | 50 % |"
