"""Paired comparisons of every method against a reference method on the same images
(`relprop compare OUT --baseline gradcam`, and summary.md's section with `evaluate --baseline`).

A pair is one (checkpoint, image, protocol) scored by both methods; the difference is method minus
baseline, so a positive ID difference means the method is better than the baseline (for deletion,
lower is better: the sign is printed as is and the arrow says which way is better).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from relprop.errors import InputError
from relprop.evaluation.metrics import METRICS
from relprop.evaluation.results import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    ResultRow,
    as_rows,
    format_ci,
)
from relprop.evaluation.statistics import paired_comparison
from relprop.methods import canonical_name


def paired_differences(records: Sequence[ResultRow | Mapping[str, Any]], baseline: str,
                       metric: str = "id") -> dict[str, dict[str, dict[str, Any]]]:
    """protocol -> method -> `paired_comparison` of (method - baseline) over the shared images."""
    if metric not in METRICS:
        raise InputError(f"--metric {metric!r}: choose from {', '.join(METRICS)}")
    rows = [r for r in as_rows(records) if r.problem is None]  # failed rows: in no pair
    reference = _resolve(rows, baseline, canonical_name)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for protocol in dict.fromkeys(r.protocol for r in rows):
        scores: dict[str, dict[tuple[str, str], Any]] = {}
        for r in rows:
            if r.protocol == protocol:
                scores.setdefault(r.method, {})[(r.checkpoint_sha256, r.image)] = r.scores[metric]
        base = scores.get(reference)
        if not base:
            continue
        for method, values in scores.items():
            if method == reference:
                continue
            shared = sorted(set(values) & set(base))
            result = paired_comparison([values[k] for k in shared], [base[k] for k in shared],
                                       n_boot=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)
            table.setdefault(protocol, {})[method] = result
    return table


def _resolve(rows: Sequence[ResultRow], baseline: str, canonical: Any) -> str:
    """The baseline's spelling in the rows (an alias such as `ours` finds `lrp-split`)."""
    methods = list(dict.fromkeys(r.method for r in rows))
    for method in methods:
        if method == baseline or canonical(method) == canonical(baseline):
            return method
    raise InputError(f"--baseline {baseline!r} is not among the evaluated methods "
                     f"({', '.join(methods)}); choose one of them")


def compare_markdown(table: dict[str, dict[str, dict[str, Any]]], baseline: str,
                     metric: str = "id") -> str:
    """One table per protocol: method - baseline, its 95 % paired bootstrap CI, Wilcoxon p."""
    spec = METRICS[metric]
    lines = []
    for protocol, rows in table.items():
        lines += [f"## Protocol `{protocol}`: {spec.title} of each method minus `{baseline}` "
                  f"({spec.arrow} is better)", "",
                  f"Paired over the images both methods scored; 95 % percentile bootstrap CI of the "
                  f"mean difference ({BOOTSTRAP_RESAMPLES} resamples of the pairs, seed "
                  f"{BOOTSTRAP_SEED}); two-sided Wilcoxon signed-rank test (scipy).", "",
                  "| Method | n | Mean difference | 95 % CI | Wilcoxon p |", "|---|---|---|---|---|"]
        for method, r in rows.items():
            lines.append(f"| {method} | {r['n']} | {r['mean_diff']:+.4f} | "
                         f"{format_ci(r['lo'], r['hi'])} | {format_p(r['wilcoxon_p'])} |")
        lines.append("")
    return "\n".join(lines)


def format_p(value: float) -> str:
    """A p-value for a table: `–` where the test is undefined (NaN), else 3 significant places."""
    if value != value:  # NaN: every difference zero
        return "–"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.3f}"
