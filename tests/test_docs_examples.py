"""The worked examples of docs/architecture.md run as written (one namespace, in order)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def test_architecture_examples_run_as_written():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 4  # a rule, a method, a metric, a composite
    namespace: dict = {"__name__": "architecture_examples"}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
