"""Write the generated blocks of README.md and docs/*.md from the program itself.

Blocks sit between `<!-- gen:NAME:begin -->` and `<!-- gen:NAME:end -->`; NAME is one of
BLOCKS. `tests/test_docs_examples.py` regenerates every block but `versions` and fails when a file
differs, so a method, rule or composite registered without the docs being regenerated is caught.

    python tools/make_docs.py               # methods, rules, composites
    python tools/make_docs.py --versions    # also the versions: run it after the whole suite passed

The supported-models table has its own writer (`python benchmarks/zoo.py --write-docs`), and the
screenshots theirs (`python tools/make_docs_images.py`).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSIONED = ("torch", "torchvision", "numpy", "captum", "timm", "transformers", "zennit", "lxt",
             "quantus", "ultralytics")


def _code(names) -> str:
    return ", ".join(f"`{name}`" for name in names)


def methods_block() -> str:
    from relprop.methods import registry

    aliases = {name: alias for alias, name in registry.ALIASES.items()}
    entries = registry._REGISTRY
    shown = [f"`{n}` (`{aliases[n]}`)" if n in aliases else f"`{n}`"
             for n, entry in entries.items() if not entry.explains_bow]
    bow = [n for n, entry in entries.items() if entry.explains_bow]
    return (f"{', '.join(shown)}; for bag-of-words models {_code(bow)}. Any name with `+hq` adds "
            "8-level Heat Quantization (`ours+hq`).")


def rules_block() -> str:
    from relprop.core.rules import rule_names

    return f"{_code(rule_names())} (`zb` needs the normalization: `mean=`, `std=`)."


def composites_block() -> str:
    from relprop.core.composites import composite_names

    return f"{_code(composite_names())}."


def composite_table_block() -> str:
    """Every registered composite with its one-line summary and the method that runs it by name."""
    from relprop.core.composites import composite_summaries
    from relprop.methods.lrp import LRP_VARIANTS

    method_of = {composite: method for method, composite in LRP_VARIANTS.items()}
    lines = ["| composite (`get_composite`) | method (`--methods`, `get_method`) | what it is |", "|---|---|---|"]
    for name, summary in composite_summaries().items():
        method = f"`{method_of[name]}`" if name in method_of else "—"
        lines.append(f"| `{name}` | {method} | {summary} |")
    return "\n".join(lines)


def faithful_families_block() -> str:
    """What `lrp-faithful` runs on each model family (relprop.methods.faithful.FAMILIES)."""
    from relprop.methods.faithful import FAMILIES

    lines = ["| family | recognized by | `lrp-faithful` runs |", "|---|---|---|"]
    for family in FAMILIES.values():
        marks = _code((*family.classes, *family.modules))
        lines.append(f"| {family.name} | {marks} | {family.summary} |")
    return "\n".join(lines)


def protocols_block() -> str:
    """The faithfulness protocols and tie modes of `relprop evaluate`, from their registry."""
    from relprop.evaluation.protocols import PROTOCOL_SPECS, TIES_HELP

    lines = ["| `--protocol` | what it does | what it rewards | scores (↑, ↓, ↑) |", "|---|---|---|---|"]
    for name, spec in PROTOCOL_SPECS.items():
        titles = ", ".join(spec.titles[k] for k in ("insertion", "deletion", "id"))
        lines.append(f"| `{name}` | {spec.help} | {spec.rewards} | {titles} |")
    lines += ["", "| `--ties` | tied map values |", "|---|---|"]
    lines += [f"| `{name}` | {text} |" for name, text in TIES_HELP.items()]
    return "\n".join(lines)


def detectors_block() -> str:
    """The detector architectures `relprop detect --arch` builds (relprop.detection.architectures)."""
    from relprop.detection.architectures import ARCHITECTURES

    lines = ["| `--arch` | family | what it is | pretrained (`--weights DEFAULT`) |", "|---|---|---|---|"]
    for a in ARCHITECTURES.values():
        weights = "torchvision's COCO_V1 (91 classes)" if a.torchvision else f"none: train it (`{a.trainer}`)"
        lines.append(f"| `{a.name}` | {a.family} | {a.summary} | {weights} |")
    return "\n".join(lines)


def _caveats(rule) -> str:
    """The rule's panel line, then each family's own where one was measured otherwise."""
    own = "".join(f"<br>{family}: {line}" for family, line in rule.family_caveats.items())
    return rule.caveat + own


def box_rules_block() -> str:
    """What a box map is, by `--box-rule` name (relprop.detection.box_rules), with its panel line."""
    from relprop.detection.box_rules import BOX_RULES

    lines = ["| `--box-rule` / `box_rule=` | what it is | what its panels say under the box maps |", "|---|---|---|"]
    lines += [f"| `{name}` | {rule.summary} | {_caveats(rule)} |" for name, rule in BOX_RULES.items()]
    return "\n".join(lines)


def versions_block() -> str:
    """The versions this environment runs, and the day: written after a whole test run passed."""
    found = []
    for name in VERSIONED:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    day = datetime.date.today().isoformat()
    return (f"Last tested (the whole suite, on the CPU) with Python {platform.python_version()}, "
            f"{', '.join(found)}; recorded on {day} by `python tools/make_docs.py --versions`.")


BLOCKS: dict[str, Callable[[], str]] = {
    "methods": methods_block,
    "rules": rules_block,
    "composites": composites_block,
    "composite-table": composite_table_block,
    "faithful-families": faithful_families_block,
    "protocols": protocols_block,
    "detectors": detectors_block,
    "box-rules": box_rules_block,
    "versions": versions_block,
}


def pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- gen:{name}:begin -->\n)(.*?)(<!-- gen:{name}:end -->)", re.S)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def render(text: str, names: tuple[str, ...]) -> str:
    """`text` with the blocks in `names` regenerated."""
    for name in names:
        body = BLOCKS[name]()
        text = pattern(name).sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(3), text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", action="store_true",
                        help="also record the installed versions (after the whole suite passed)")
    args = parser.parse_args()
    names = tuple(n for n in BLOCKS if n != "versions" or args.versions)
    for path in documents():
        text = path.read_text(encoding="utf-8")
        new = render(text, names)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
