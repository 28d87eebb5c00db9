"""The faithful-LRP search (issue #14, section 1): every candidate against the paper's method as its
authors compute it (`ours-ref+hq`), image by image, with paired statistics.

    nice python benchmarks/faithful_search.py --out bench_out/faithful --per-class 2      # CPU check
    python benchmarks/faithful_search.py --out bench_out/faithful --device cuda             # 250 images
    python benchmarks/faithful_search.py --out bench_out/faithful_rise --device cuda --protocol rise

Candidates are `relprop.methods.faithful.Candidate`s (stage rules, input rule, split, identity
skips, αβ, positive part, HQ levels and bins), registered here as methods `cand-<key>` and run by
relprop's own `evaluate` (tin10 val, shared ResNet-18, the paper protocol by default), which writes
OUT/results.jsonl and resumes where it stopped (a bad image is skipped and reported). The table
(OUT/faithful_search.md) gives each candidate's mean ID with a 95 % bootstrap CI, and its paired
difference to `ours-ref+hq` (mean, 95 % bootstrap CI, Wilcoxon p) over the images both scored.
HQ with bins in units of the total ("total") takes its range from tin10 *train* images
(`--calibrate` of them), never from the images it is scored on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from class_sensitivity import tin10_images

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = "ours-ref+hq"
# registered methods compared as they are (the paper's method and its ablations)
REGISTERED = ["ours-ref+hq", "ours-ref", "ours+hq", "ours", "ours-sym+hq", "ours-noid+hq",
              "ours-sym-noid+hq", "lrp-plain+hq", "lrp-faithful"]


def candidates(total_range: tuple[float, float] | None) -> dict[str, object]:
    """key -> Candidate: the literature's space, one change at a time around two centres (the
    paper's z+ composite and the γ/ε/zB composite)."""
    from relprop.methods.faithful import Candidate as C

    gez = {"lower": "gamma", "upper": "epsilon", "head": "epsilon", "bn": "fold"}
    found = {
        # γ lower / ε upper with each input rule, ratio split, with and without HQ
        "gez-zb": C(**gez, input_rule="zb"),
        "gez-zb-hq": C(**gez, input_rule="zb", hq_levels=8),
        "gez-w2-hq": C(**gez, input_rule="w2", hq_levels=8),
        "gez-flat-hq": C(**gez, input_rule="flat", hq_levels=8),
        "gez-wplus-hq": C(**gez, input_rule="wplus", hq_levels=8),  # the reference's ones input
        # its splits, with and without identity skips
        "gez-zb-sym-hq": C(**gez, input_rule="zb", split="symmetric", hq_levels=8),
        "gez-zb-signed-hq": C(**gez, input_rule="zb", split="signed", hq_levels=8),
        "gez-zb-noid-hq": C(**gez, input_rule="zb", identity_skips=False, hq_levels=8),
        # the standard composites (signed split: plain LRP) and αβ
        "epsilon-gamma-box-hq": C(base="epsilon-gamma-box", hq_levels=8),
        "epsilon-plus-flat-hq": C(base="epsilon-plus-flat", hq_levels=8),
        "alpha2beta1-hq": C(base="alpha2beta1", hq_levels=8),
        "a2b1-ratio-hq": C(lower="alpha2beta1", upper="alpha2beta1", bn="fold", hq_levels=8),
        # the paper's composite with other HQ levels, bins, and the positive part only
        "zplus-hq4": C(base="lrp-split", hq_levels=4),
        "zplus-hq16": C(base="lrp-split", hq_levels=16),
        "zplus-pos-hq": C(base="lrp-split", positive=True, hq_levels=8),  # z+ maps are >= 0: a check
        "ref-hq4": C(base="lrp-split-ref", hq_levels=4),
        "ref-hq16": C(base="lrp-split-ref", hq_levels=16),
    }
    if total_range is not None:
        found["zplus-hq-total"] = C(base="lrp-split", hq_levels=8, hq_bins="total", hq_range=total_range)
    return found


def calibrate_total_range(model, info, count: int) -> tuple[float, float]:
    """1st and 99th percentile of `lrp-split` maps in units of their total, on tin10 *train*."""
    from relprop.methods import get_method

    x = torch.stack([image for _, image in tin10_images(info, count, max(1, count // 10), "train")])
    heat = get_method("lrp-split", model, mean=info.mean, std=info.std).attribute(x).sum(1)
    share = heat / heat.flatten(1).sum(1)[:, None, None]
    low, high = np.percentile(share.numpy(), [1, 99])
    return float(low), float(high)


def register_candidates(found: dict[str, object]) -> list[str]:
    from relprop.methods import method_names, register
    from relprop.methods.faithful import CandidateMethod

    names = []
    for key, candidate in found.items():
        name = f"cand-{key}"
        if name not in method_names():
            register(name, lambda model, n, options, c=candidate: CandidateMethod(
                model, n, c, options.mean, options.std, **options.lrp), takes_lrp_options=True)
        names.append(name)
    return names


def paired_table(records: list[dict], methods: list[str], protocol: str, metric: str = "id") -> str:
    """Markdown: mean [95 % CI] of each method, paired difference to the reference."""
    from relprop.evaluation.compare import paired_differences
    from relprop.evaluation.statistics import mean_sem_ci

    by_method: dict[str, list[float]] = {}
    for r in records:
        if r["protocol"] == protocol:
            by_method.setdefault(r["method"], []).append(float(r[metric]))
    paired = paired_differences(records, REFERENCE, metric).get(protocol, {})
    lines = [f"| method | n | {metric} mean [95 % CI] | diff to {REFERENCE} [95 % CI] | Wilcoxon p |",
             "|---|---|---|---|---|"]
    rows = []
    for name in methods:
        scores = by_method.get(name)
        if not scores:
            continue
        mean, _, lo, hi = mean_sem_ci(scores)
        c = paired.get(name)
        if c is not None and c["n"] > 1:
            diff = f"{c['mean_diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]"
            p = f"{c['wilcoxon_p']:.3g}"
        else:
            diff, p = "—", "—"
        rows.append((mean, f"| {name} | {len(scores)} | {mean:.4f} [{lo:.4f}, {hi:.4f}] | {diff} | {p} |"))
    lines += [row for _, row in sorted(rows, key=lambda r: -r[0])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out/faithful"))
    parser.add_argument("--limit", type=int, default=None, help="first N val images (default: all 250)")
    parser.add_argument("--per-class", type=int, default=None)
    parser.add_argument("--protocol", default="paper", choices=["paper", "rise"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--calibrate", type=int, default=20, help="tin10 train images for HQ 'total' bins")
    parser.add_argument("--only", nargs="*", default=None, help="candidate keys to run (default: all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from relprop.evaluation.classification import Checkpoint, EvalConfig, evaluate
    from relprop.evaluation.results import read_jsonl
    from relprop.models import load_model

    path = SHARED / "models" / "resnet18_tin10.pt"
    model, info = load_model(path)
    args.out.mkdir(parents=True, exist_ok=True)
    range_file = args.out / "hq_total_range.json"
    if range_file.is_file():  # resumed runs keep the range their first run used
        total_range = tuple(json.loads(range_file.read_text()))
    else:
        total_range = calibrate_total_range(model, info, args.calibrate)
        range_file.write_text(json.dumps(total_range))
    found = candidates(total_range)
    if args.only is not None:
        found = {k: v for k, v in found.items() if k in args.only}
    methods = REGISTERED + register_candidates(found)
    config = EvalConfig(data=SHARED / "data" / "tin10" / "val", out=args.out, methods=tuple(methods),
                        protocols=(args.protocol,), limit=args.limit, per_class=args.per_class,
                        device=torch.device(args.device))
    outcome = evaluate(config, [Checkpoint.of(model, info, str(path))])
    if outcome.failed_methods:
        print(f"faithful_search: could not run {', '.join(outcome.failed_methods)}", file=sys.stderr)
    records = read_jsonl(args.out / "results.jsonl")
    text = paired_table(records, methods, args.protocol)
    candidates_md = "\n".join(f"- `cand-{k}`: {c}" for k, c in found.items())
    (args.out / "faithful_search.md").write_text(
        f"{text}\n\nHQ 'total' range (tin10 train, 1st/99th percentile): {total_range}\n\n{candidates_md}\n")
    print(text)


if __name__ == "__main__":
    main()
