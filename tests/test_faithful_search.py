"""benchmarks/faithful_search.py --halves: the two halves and the choice made on half A."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import faithful_search  # noqa: E402


def make_data(root: Path, sizes: dict[str, int]) -> Path:
    for wnid, count in sizes.items():
        (root / wnid).mkdir(parents=True)
        for i in range(count):
            (root / wnid / f"val_{i}.JPEG").write_bytes(b"")
    return root


def test_halves_are_disjoint_per_class_seeded_and_cover_the_data(tmp_path):
    data = make_data(tmp_path / "val", {"n1": 5, "n2": 4})
    halves = faithful_search.split_halves(data, seed=0)
    a, b = halves["A"], halves["B"]
    assert not set(a) & set(b) and sorted(a + b) == sorted(f"{w}/{f.name}" for w in ("n1", "n2")
                                                             for f in (data / w).iterdir())
    assert [x.split("/")[0] for x in a] == ["n1"] * 3 + ["n2"] * 2  # per class, A gets the odd one
    assert faithful_search.split_halves(data, seed=0) == halves
    assert faithful_search.split_halves(data, seed=1) != halves
    assert faithful_search.take_per_class(a, 1) == [a[0], a[3]]


def rows(scores: dict[tuple[str, str], list[float]]) -> list[dict]:
    return [{"image": f"n1/{'abc'[i]}.JPEG", "method": method, "protocol": protocol, "id": value,
             "insertion": value, "deletion": 0.0}
            for (method, protocol), values in scores.items() for i, value in enumerate(values)]


def test_choice_is_the_best_worst_protocol_margin_over_each_protocols_best_baseline():
    records = rows({
        ("gradcam", "paper"): [0.5, 0.5, 0.5], ("ig", "paper"): [0.2, 0.2, 0.2],
        ("gradcam", "rise"): [0.1, 0.1, 0.1], ("ig", "rise"): [0.6, 0.6, 0.6],
        # a wins the paper protocol by far but loses RISE's; b is ahead in both by a little
        ("cand-a", "paper"): [0.9, 0.9, 0.9], ("cand-a", "rise"): [0.5, 0.5, 0.5],
        ("cand-b", "paper"): [0.55, 0.55, 0.55], ("cand-b", "rise"): [0.62, 0.62, 0.62],
    })
    best, chosen, margins = faithful_search.choose(records, ["cand-a", "cand-b"], ["gradcam", "ig"],
                                                   ["paper", "rise"])
    assert best == {"paper": "gradcam", "rise": "ig"}
    assert chosen == "cand-b"
    assert margins["cand-a"] == pytest.approx({"paper": 0.4, "rise": -0.1})
    assert margins["cand-b"] == pytest.approx({"paper": 0.05, "rise": 0.02})


def test_choice_counts_the_protocols_a_candidate_is_not_below_before_the_worst_margin():
    """c is below the best baseline in all three protocols (worst margin -0.2); d ties it in two
    (its paired CI reaches 0) and loses the third by 0.25: the goal counts protocols, so d."""
    base = {("gradcam", p): [0.5, 0.5, 0.5] for p in ("paper", "rise", "road")}
    records = rows({
        **base,
        ("cand-c", "paper"): [0.3, 0.3, 0.3], ("cand-c", "rise"): [0.35, 0.35, 0.35],
        ("cand-c", "road"): [0.4, 0.4, 0.4],
        ("cand-d", "paper"): [0.6, 0.4, 0.5], ("cand-d", "rise"): [0.25, 0.25, 0.25],
        ("cand-d", "road"): [0.45, 0.55, 0.5],
    })
    _, chosen, margins = faithful_search.choose(records, ["cand-c", "cand-d"], ["gradcam"],
                                                ["paper", "rise", "road"])
    assert min(margins["cand-c"].values()) > min(margins["cand-d"].values())  # the old rule's pick: c
    assert chosen == "cand-d"


def test_family_candidates_stay_small_and_pair_the_vit_splits():
    for family in ("resnet", "convnext", "mobilenet", "vit"):
        assert len(faithful_search.family_candidates(family)) <= 10
    vit = faithful_search.family_candidates("vit")
    assert {c.base_split for c in vit.values()} == {"ratio", "signed"}
    assert {c.base for c in vit.values()} == {"cp-lrp", "attnlrp"}


def test_a_half_reruns_only_the_groups_it_lacks():
    images, protocols = ["n1/a.JPEG", "n1/b.JPEG"], ["paper", "rise"]
    records = rows({("ig", "paper"): [0.1, 0.2], ("ig", "rise"): [0.3, 0.4], ("ig+hq", "paper"): [0.1]})
    assert faithful_search.groups(["ig", "cand-a", "ig+hq", "gradcam+hq"]) == [["ig", "ig+hq"], ["cand-a"],
                                                                               ["gradcam+hq"]]
    assert faithful_search.complete(records, ["ig"], images, protocols)
    assert not faithful_search.complete(records, ["ig", "ig+hq"], images, protocols)
