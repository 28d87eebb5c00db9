"""The faithfulness protocols and tie modes: the one list that `relprop evaluate`, its --help, the
docs (tools/make_docs.py) and the benchmarks read. Plain data, no torch, so --help stays fast;
`metrics.insertion_deletion` maps each name to its frames.

Every protocol fills the same three scores of a row (`insertion`, `deletion`, `id`): two curves,
one where higher is better and one where lower is better, and their difference (higher better).
`titles` says what the two curves are in that protocol (ROAD's are LeRF and MoRF).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

TIES = ("reference", "random")
TIES_HELP = {
    "reference": "ties as the protocol's reference code treats them (paper: a tied level enters "
                 "in one frame; rise, road: stable sort, i.e. raster order inside a tie)",
    "random": "ties ordered by a random permutation seeded by --seed and the image's name; a map "
              "without ties scores exactly as in `reference`",
}
DEFAULT_TIES = "reference"
DEFAULT_SEED = 0
TITLES = {"insertion": "Insertion", "deletion": "Deletion", "id": "ID"}


@dataclass(frozen=True)
class ProtocolSpec:
    """One protocol: what its help and docs say, the titles of its scores, and whether its frames
    draw noise (then the seed changes its scores in every tie mode)."""

    name: str
    help: str
    rewards: str
    titles: dict[str, str] = field(default_factory=lambda: dict(TITLES))
    noisy: bool = False


PROTOCOL_SPECS: dict[str, ProtocolSpec] = {
    "paper": ProtocolSpec(
        "paper",
        "Otsuki et al.: pixels ranked by the 2-D map, --step 500 pixels per frame (K = ceil(H*W/500) "
        "frames), removed pixels black, softmax probability of the ground-truth class, trapezoid AUC",
        "maps whose top pixels alone keep the true class; a removed region is a black shape the "
        "model can read, and in `reference` ties a whole tied level enters at once (Heat "
        "Quantization's 8 levels)"),
    "rise": ProtocolSpec(
        "rise",
        "RISE (Petsiuk 2018): insertion from a blurred copy, deletion to zeros of the normalized "
        "space, one image width of pixels per frame, the predicted class",
        "maps that order every pixel well (one row a frame); the blur start favours compact blobs "
        "(CAMs) and the zero end favours gradient x input"),
    "road": ProtocolSpec(
        "road",
        "ROAD (Rong et al. 2022): 0, 10, ..., 90 % of the pixels removed by noisy linear imputation "
        "(neighbour mean + N(0, 0.01) noise), least (LeRF) or most (MoRF) relevant first, the "
        "predicted class; id = LeRF - MoRF",
        "maps whose order holds under a removal that leaves no shape or colour for the model to "
        "read: neither CAM blobs nor zero baselines have an edge",
        titles={"insertion": "LeRF", "deletion": "MoRF", "id": "LeRF − MoRF"}, noisy=True),
}
PROTOCOLS = tuple(PROTOCOL_SPECS)


def seeded(protocol: str, ties: str) -> bool:
    """Whether the seed changes this protocol's scores (random ties, or noise in its frames)."""
    spec = PROTOCOL_SPECS.get(protocol)
    return ties == "random" or (spec is not None and spec.noisy)


def help_lines(indent: str = "  ", width: int = 100) -> str:
    """The protocols and tie modes for --help, wrapped to `width`."""
    entries = [*((name, spec.help) for name, spec in PROTOCOL_SPECS.items()),
               *((f"--ties {name}", text) for name, text in TIES_HELP.items())]
    rows = []
    for name, text in entries:
        first = f"{indent}{name:<18}"
        rows.append(textwrap.fill(text, width, initial_indent=first,
                                  subsequent_indent=" " * len(first)))
    return "\n".join(rows)
