"""The worked examples of docs/architecture.md run as written (one namespace, in order)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def test_architecture_examples_run_as_written():
    """Each block registers its toy addition; every registry is restored afterwards, in place
    (modules that imported a registry hold the same dict)."""
    from relprop.core import composites, ops, rules
    from relprop.evaluation import metrics
    from relprop.methods import registry

    registries = [rules.RULES, registry._REGISTRY, registry.ALIASES, metrics.METRICS, composites._REGISTRY]
    saved = [dict(r) for r in registries]
    saved_ops = list(ops.OPS)
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 5  # a rule, a method, a metric, a composite, an op
    namespace: dict = {"__name__": "architecture_examples"}
    try:
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
    finally:
        for registry_dict, contents in zip(registries, saved, strict=True):
            registry_dict.clear()
            registry_dict.update(contents)
        ops.OPS[:] = saved_ops
