"""The docs say what the program does: every Python block of README.md and docs/*.md runs as
written, every printed output block that a command makes offline is what the program prints now,
and the generated parts (method, rule and composite lists, versions, checkpoint keys) are current.

Conventions of the Markdown files:
- ```python blocks run in order, one namespace per file, from a folder whose `../shared` is the
  example data (as from the repository root); a plain ``` block right after one is its stdout.
- ```console blocks are `$ command` lines (`\\` continues one) each followed by its output; a `...`
  line stands for any lines. Commands run offline, `relprop` being this tree's.
- ```bash and plain blocks are not run (long runs, commands with placeholders).
- `<!-- docs-test: skip REASON -->` on the line before a block skips it; SKIPPED counts them.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pytest

from sharedfiles import SHARED

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_docs  # noqa: E402

FILES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
# Blocks not run, each marked in its file with the reason: a new skip is a decision made here too.
SKIPPED = {"README.md": 1, "docs/bow.md": 1}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.S | re.M)
SKIP = re.compile(r"<!-- docs-test: skip (.+?) -->\s*$")


@dataclass
class Block:
    file: str
    line: int
    lang: str
    body: str
    skip: str | None
    output: str | None = None  # the plain block right after a python block


def blocks(file: str) -> list[Block]:
    text = (ROOT / file).read_text(encoding="utf-8")
    found: list[Block] = []
    end = 0
    for match in FENCE.finditer(text):
        before = text[end:match.start()]
        lines = [line for line in before.splitlines() if line.strip()]
        skip = SKIP.match(lines[-1]) if lines else None
        if (match.group(1) == "" and found and found[-1].lang == "python" and not before.strip()
                and found[-1].output is None):
            found[-1].output = match.group(2)
        else:
            found.append(Block(file, text.count("\n", 0, match.start()) + 1, match.group(1),
                               match.group(2), skip.group(1) if skip else None))
        end = match.end()
    return found


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A folder beside a `shared` link, so that `../shared/...` means the example data."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not available (the example data sits beside the repository)")
    top = tmp_path_factory.mktemp("docs")
    (top / "shared").symlink_to(SHARED)
    (top / "repo").mkdir()
    return top / "repo"


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def matches(expected: list[str], got: list[str]) -> bool:
    """`expected` with each `...` line standing for any number of lines."""
    if not expected:
        return not got
    if expected[0] == "...":
        return any(matches(expected[1:], got[i:]) for i in range(len(got) + 1))
    return bool(got) and got[0] == expected[0] and matches(expected[1:], got[1:])


def test_skips_are_counted():
    found = {f: sum(b.skip is not None for b in blocks(f)) for f in FILES}
    assert {f: n for f, n in found.items() if n} == SKIPPED


@pytest.mark.parametrize("file", [f for f in FILES if any(b.lang == "python" for b in blocks(f))])
def test_python_blocks_run_and_print_what_they_show(file, sandbox, monkeypatch):
    """Every registry is restored afterwards, in place (docs/architecture.md registers toys)."""
    from relprop.core import composites, ops, rules
    from relprop.evaluation import metrics
    from relprop.methods import registry

    if file == "docs/huggingface.md":
        pytest.importorskip("transformers")
    monkeypatch.chdir(sandbox)
    registries = [rules.RULES, registry._REGISTRY, registry.ALIASES, metrics.METRICS, composites._REGISTRY]
    saved, saved_ops = [dict(r) for r in registries], list(ops.OPS)
    namespace: dict = {"__name__": "docs_example"}
    try:
        for block in blocks(file):
            if block.lang != "python" or block.skip:
                continue
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(compile(block.body, f"{file}:{block.line}", "exec"), namespace)
            if block.output is not None:
                assert _lines(printed.getvalue()) == _lines(block.output), f"{file}:{block.line}"
    finally:
        for registry_dict, contents in zip(registries, saved, strict=True):
            registry_dict.clear()
            registry_dict.update(contents)
        ops.OPS[:] = saved_ops


def commands() -> list[tuple[str, int, str, list[str]]]:
    """(file, line, command, expected output) of every console block not marked skip."""
    found = []
    for file in FILES:
        for block in blocks(file):
            if block.lang != "console" or block.skip:
                continue
            command, expected, current = None, [], None
            for line in block.body.splitlines():
                if line.startswith("$ "):
                    if command is not None:
                        found.append((file, block.line, command, expected))
                    command, expected, current = line[2:], [], "command"
                elif current == "command" and command.endswith("\\"):
                    command = command[:-1] + " " + line.strip()
                else:
                    current = "output"
                    expected.append(line.rstrip())
            if command is not None:
                found.append((file, block.line, command, expected))
    return found


@pytest.mark.parametrize("file, line, command, expected", commands(),
                         ids=[f"{f}:{n}:{c.split()[1]}" for f, n, c, _ in commands()])
def test_console_blocks_print_what_they_show(file, line, command, expected, sandbox):
    argv = shlex.split(command)
    assert argv[0] == "relprop", f"{file}:{line}: only relprop commands are run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "100", "TORCH_HOME": str(sandbox / ".torch")}
    done = subprocess.run([sys.executable, "-m", "relprop", *argv[1:]], cwd=sandbox, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    got = _lines(done.stdout)
    assert matches(_lines("\n".join(expected)), got), f"{file}:{line}: {command}\n" + "\n".join(got)


def test_generated_lists_are_current():
    """A method, rule or composite registered without `python tools/make_docs.py` fails here."""
    names = tuple(n for n in make_docs.BLOCKS if n != "versions")
    seen = set()
    for path in make_docs.documents():
        text = path.read_text(encoding="utf-8")
        seen |= {n for n in names if make_docs.pattern(n).search(text)}
        assert make_docs.render(text, names) == text, f"{path.name}: run python tools/make_docs.py"
    assert seen == set(names)


def test_versions_are_those_installed():
    """The README's versions are those of the last recorded test run: rerun the suite and
    `python tools/make_docs.py --versions` after an upgrade."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = make_docs.pattern("versions").search(text)
    assert block, "README.md has no versions block"
    recorded = dict(re.findall(r"([A-Za-z]+) (\d+\.\d+[\w.+]*)", block.group(2)))
    assert recorded.pop("Python") == ".".join(map(str, sys.version_info[:3]))
    assert recorded and recorded == {name: version(name) for name in recorded}


def test_checkpoint_keys_are_the_ones_written():
    from relprop.checkpoints import CHECKPOINT_KEYS

    text = (ROOT / "docs" / "checkpoints.md").read_text(encoding="utf-8")
    table = text.split("<!-- checkpoint-keys:begin -->")[1].split("<!-- checkpoint-keys:end -->")[0]
    assert tuple(re.findall(r"^\| `(\w+)` \|", table, re.M)) == CHECKPOINT_KEYS


def test_readme_starts_python_with_load_model_and_hides_nothing():
    """The first Python line that does something loads a model; no reference a reader cannot
    follow (private issue numbers); `../shared` only for the example data."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first = next(b for b in blocks("README.md") if b.lang == "python")
    code = [line for line in first.body.splitlines() if line and not line.startswith(("import", "from"))]
    assert "relprop.load_model(" in code[0]
    for file in FILES:
        text = (ROOT / file).read_text(encoding="utf-8")
        assert not re.search(r"\bissues? #?\d+", text, re.I), file
    loose = [m.start() for m in re.finditer(r"\.\./shared(?!/(data|models)/)", readme)]
    assert len(loose) == 1  # the sentence that introduces the example data
