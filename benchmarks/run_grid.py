"""The 250-image grid of docs/results.md: the command that runs it, and its tables.

    python benchmarks/run_grid.py run --device cuda --nproc 2 --out runs/grid250
    python benchmarks/run_grid.py tables runs/grid250 > runs/grid250/tables.md

`run` starts (or resumes) `relprop evaluate --launcher torchrun` over every LRP variant and every
baseline, each with and without +hq, both protocols, on all of ../shared/data/tin10/val; it prints
the exact command first. `tables` reads the union of the ranks' results and writes, per protocol,
every method's mean, SE and 95 % bootstrap CI, then the paper's three claims as paired tests
(95 % paired bootstrap CI of the mean ID difference, Wilcoxon signed-rank p):
ours+hq against the best baseline, the ratio split against the symmetric one, and identity
skips on against off. A claim "holds" when the CI lies above 0 and Wilcoxon p < 0.05, is
"reversed" when the CI lies below 0 and p < 0.05, and is "not resolved" otherwise.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

LRP_VARIANTS = ("lrp-split", "lrp-split-sym", "lrp-split-noid", "lrp-split-sym-noid",
                "lrp-split-ref", "lrp-plain")
BASELINES = ("gradcam", "scorecam", "ig", "gbp", "lrp-captum", "gradient", "gradxinput")
ALPHA = 0.05
METHODS = tuple(m + hq for m in LRP_VARIANTS + BASELINES for hq in ("", "+hq"))
# (label, method, reference): the paper's claims; "best baseline" is chosen per protocol by ID
CLAIMS = (
    ("ours+hq vs the best baseline", "lrp-split+hq", "BEST"),
    ("ours vs the best baseline", "lrp-split", "BEST"),
    ("ratio vs symmetric split", "lrp-split", "lrp-split-sym"),
    ("ratio vs symmetric split, +hq", "lrp-split+hq", "lrp-split-sym+hq"),
    ("identity skips on vs off (ratio)", "lrp-split", "lrp-split-noid"),
    ("identity skips on vs off (symmetric)", "lrp-split-sym", "lrp-split-sym-noid"),
)


def command(args: argparse.Namespace) -> list[str]:
    shared = Path(args.shared)
    return [sys.executable, "-m", "relprop", "evaluate", "--launcher", "torchrun",
            "--nproc-per-node", str(args.nproc),
            "--weights", str(shared / "models" / "resnet18_tin10.pt"),
            "--data", str(shared / "data" / "tin10" / "val"),
            "--methods", ",".join(METHODS), "--protocol", "paper,rise",
            "--batch-size", str(args.batch_size), "--device", args.device,
            "--baseline", "gradcam", "--out", str(args.out)]


def run(args: argparse.Namespace) -> int:
    line = command(args)
    print("+ " + shlex.join(line), file=sys.stderr)
    return subprocess.call(line)


def tables(args: argparse.Namespace) -> int:
    from relprop.evaluation.compare import format_p
    from relprop.evaluation.metrics import METRICS
    from relprop.evaluation.results import format_ci, read_union
    from relprop.evaluation.statistics import finite_mean, mean_sem_ci, paired_comparison

    out = Path(args.out)
    records = read_union(out, "results", lambda r: (r["checkpoint_sha256"], r["image"], r["method"],
                                                    r["protocol"]))
    if not records:
        print(f"{out}: no results (run `python benchmarks/run_grid.py run` first)", file=sys.stderr)
        return 1
    from relprop.methods import canonical_name

    scores: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for r in sorted(records, key=lambda r: r["image"]):  # image order: reproducible bootstrap
        key = (r["protocol"], canonical_name(r["method"]))  # `ours` is lrp-split
        scores.setdefault(key, {})[r["image"]] = {k: r[k] for k in METRICS}
    protocols = list(dict.fromkeys(r["protocol"] for r in records))
    lines = []
    for protocol in protocols:
        methods = [m for m in METHODS if (protocol, m) in scores]
        lines += [f"#### Protocol `{protocol}`: {len(scores[protocol, methods[0]])} images; mean, SE "
                  "and 95 % bootstrap CI over images (10,000 resamples, seed 0)", "",
                  "| Method | n | Insertion ↑ | Deletion ↓ | ID ↑ | ID SE | ID 95 % CI |",
                  "|---|---|---|---|---|---|---|"]
        for m in methods:
            per = scores[protocol, m]
            ins, dele = (finite_mean([v[k] for v in per.values()]) for k in ("insertion", "deletion"))
            mean, sem, low, high = mean_sem_ci([v["id"] for v in per.values()])
            lines.append(f"| {m} | {len(per)} | {ins:.3f} | {dele:.3f} | {mean:.3f} | {sem:.3f} | "
                         f"{format_ci(low, high)} |")
        lines.append("")
    lines += ["#### The paper's three claims, paired over images (ID difference, method − reference)", "",
              "| Claim | Protocol | Method | Reference | n | Mean ΔID | 95 % CI | Wilcoxon p | Verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for protocol in protocols:
        best = _best_baseline(scores, protocol)
        for label, method, reference in CLAIMS:
            reference = best if reference == "BEST" else reference
            if reference is None or (protocol, method) not in scores or (protocol, reference) not in scores:
                continue
            a, b = scores[protocol, method], scores[protocol, reference]
            shared = sorted(set(a) & set(b))
            r = paired_comparison([a[i]["id"] for i in shared], [b[i]["id"] for i in shared])
            p = r["wilcoxon_p"]
            significant = p == p and p < ALPHA
            verdict = ("holds" if significant and r["lo"] > 0 else
                       "reversed" if significant and r["hi"] < 0 else "not resolved")
            lines.append(f"| {label} | `{protocol}` | {method} | {reference} | {r['n']} | "
                         f"{r['mean_diff']:+.4f} | {format_ci(r['lo'], r['hi'])} | "
                         f"{format_p(p)} | {verdict} |")
    print("\n".join(lines))
    return 0


def _best_baseline(scores: dict, protocol: str) -> str | None:
    """The baseline (with or without +hq) of the highest mean ID under `protocol`."""
    import numpy as np

    found = {m: float(np.mean([v["id"] for v in scores[protocol, m].values()]))
             for m in (b + hq for b in BASELINES for hq in ("", "+hq")) if (protocol, m) in scores}
    return max(found, key=found.get) if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    go = sub.add_parser("run", help="start or resume the grid (prints the command)")
    go.add_argument("--device", default="cuda")
    go.add_argument("--nproc", type=int, default=2)
    go.add_argument("--batch-size", type=int, default=32)
    go.add_argument("--out", type=Path, default=Path("runs/grid250"))
    go.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    show = sub.add_parser("tables", help="the docs/results.md tables of a finished (or partial) grid")
    show.add_argument("out", type=Path)
    args = parser.parse_args()
    return run(args) if args.step == "run" else tables(args)


if __name__ == "__main__":
    sys.exit(main())
