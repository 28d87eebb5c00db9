"""The evaluation's boundaries (issue 10): the library never imports the CLI nor parses arguments,
one summarize prints the same ± everywhere, the metric list is read generically, method names and
aliases, the report's assets as package data, and no global matplotlib state."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from relprop.cli.main import main

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "relprop"

RUN_SCRIPT = """
import sys, torch, torchvision
import matplotlib
matplotlib.use("pdf")
from pathlib import Path
from PIL import Image
root = Path(sys.argv[1])
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=2)
torch.save({"arch": "resnet18", "num_classes": 2, "classes": ["a", "b"], "input_size": 32,
            "resize": 32, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
            "state_dict": model.state_dict()}, root / "tiny.pt")
for k, cls in enumerate("ab"):
    (root / "data" / cls).mkdir(parents=True)
    for i in range(3):
        pixels = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(10 * k + i))
        Image.fromarray((pixels.numpy() * 255).astype("uint8")).save(root / "data" / cls / f"{i}.png")
from relprop.cli.main import main
code = main(["evaluate", "--weights", str(root / "tiny.pt"), "--data", str(root / "data"),
             "--methods", "gradcam,gradient", "--step", "256", "--device", "cpu",
             "--out", str(root / "eval")])
print("BACKEND", matplotlib.get_backend(), "CODE", code)
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A real `relprop evaluate` of a random ResNet-18 on six 32 px images, in a fresh process
    whose matplotlib backend was set to pdf before."""
    root = tmp_path_factory.mktemp("tiny")
    done = subprocess.run([sys.executable, "-c", RUN_SCRIPT, str(root)], capture_output=True,
                          text=True, timeout=600, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    return root, done.stdout


# ---------------------------------------------------------------- boundaries


def _imports(path: Path, module_level: bool = False) -> list[str]:
    """Every module a source file imports (inside functions too, unless `module_level`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []
    for node in tree.body if module_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _library_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py")
            if "cli" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"]


def test_the_library_never_imports_the_cli_nor_argparse() -> None:
    offenders = {str(p.relative_to(SRC)): name for p in _library_files() for name in _imports(p)
                 if name == "argparse" or name == "relprop.cli" or name.startswith("relprop.cli.")}
    assert offenders == {}
    assert any(p.name == "classification.py" for p in _library_files())  # the walk found the code


def test_importing_the_evaluation_loads_no_cli_module() -> None:
    code = ("import sys, relprop.evaluation.classification, relprop.evaluation.detection, "
            "relprop.report, relprop.models, relprop.viz; "
            "print(sorted(m for m in sys.modules if m.startswith('relprop.cli') or m == 'argparse'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert [m for m in eval(done.stdout) if m.startswith("relprop.cli")] == []


def test_module_level_imports_have_no_cycle() -> None:
    """Module-level imports between relprop's modules (what runs at import time) form a DAG."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {name: {m for m in _imports(path, module_level=True) if m in modules and m != name}
             for name, path in modules.items() if name.split(".")[:2] != ["relprop", "cli"]}
    graph = {k: {m for m in v if m in graph} for k, v in graph.items()}
    seen: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1 and nxt != "relprop":  # the package root re-exports only
                raise AssertionError(" -> ".join([*stack, node, nxt]))
            if nxt not in seen:
                visit(nxt, [*stack, node])
        seen[node] = 2

    for name in sorted(graph):
        if name not in seen:
            visit(name, [])


# A unit is a subpackage (relprop.methods) or a top-level module (relprop.models); the package root
# only re-exports, lazily (its TYPE_CHECKING block never runs): `from relprop import LRP` counts as
# an import of the module the root takes LRP from.
def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _root_exports() -> dict[str, str]:
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("relprop/__init__.py has no _EXPORTS")


def _all_imports(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every relprop import in a file: module level, inside functions and
    TYPE_CHECKING blocks alike, relative imports resolved; names imported from a package that are
    its submodules count as those submodules."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = set()
    if name == "relprop":  # the root's `if TYPE_CHECKING:` imports are for type checkers only
        skipped = {id(n) for node in tree.body if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    exports = _root_exports()
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                if module == "relprop" and alias.name in exports:
                    found.append((exports[alias.name], node.lineno))
                elif (PACKAGE.parent / module.replace(".", "/") / alias.name).with_suffix(".py").is_file() \
                        or (PACKAGE.parent / module.replace(".", "/") / alias.name).is_dir():
                    found.append((f"{module}.{alias.name}", node.lineno))
                else:
                    found.append((module, node.lineno))
    return [(m, line) for m, line in found if m == "relprop" or m.startswith("relprop.")]


def _unit_edges() -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> the `file:line`s of the imports that make the edge."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _unit(_module_name(path))
        for module, line in _all_imports(path):
            where = f"{path.relative_to(SRC)}:{line}"
            if _unit(module) != source and where not in edges.get((source, _unit(module)), []):
                edges.setdefault((source, _unit(module)), []).append(where)
    return edges


def test_no_package_imports_one_that_imports_it_back() -> None:
    """The strict import graph between relprop's units, counting the imports inside functions too,
    has no strongly connected component of more than one unit."""
    edges = _unit_edges()
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reachable = {unit: reach(unit) for unit in graph}
    assert {"relprop.methods", "relprop.evaluation", "relprop.bow", "relprop.models"} <= set(graph)
    problems = []
    for unit in sorted(graph):
        if unit not in reachable[unit]:
            continue
        component = sorted(u for u in reachable[unit] if unit in reachable[u])
        if component[0] != unit:
            continue  # each component once, from its first unit
        # one shortest circle through `unit`, and where each of its edges is written
        paths, todo = {unit: [unit]}, [unit]
        while todo:
            here = todo.pop(0)
            for nxt in sorted(graph[here] & set(component)):
                if nxt == unit:
                    todo, circle = [], [*paths[here], unit]
                    break
                if nxt not in paths:
                    paths[nxt] = [*paths[here], nxt]
                    todo.append(nxt)
        steps = list(zip(circle[:-1], circle[1:], strict=True))
        others = sorted(e for e in edges if e[0] in component and e[1] in component and e not in steps)
        lines = [f"{a} -> {b}: {', '.join(edges[a, b])}" for a, b in steps]
        lines += ["other edges inside the component:"] * bool(others)
        lines += [f"{a} -> {b}: {', '.join(edges[a, b])}" for a, b in others]
        problems.append(f"import circle {' -> '.join(circle)} (component {', '.join(component)}):\n  "
                        + "\n  ".join(lines))
    assert not problems, "\n".join(problems)


def test_the_library_never_imports_the_cli_even_relatively() -> None:
    edges = _unit_edges()
    into_cli = {a: where for (a, b), where in edges.items()
                if b == "relprop.cli" and a != "relprop.__main__"}  # `python -m relprop` is the CLI
    assert into_cli == {}
    assert ("relprop.cli", "relprop.evaluation") in edges  # the walk saw the CLI's own imports


def test_every_function_local_import_says_why() -> None:
    """An import inside a function is kept only where it keeps `relprop --help` (or `import relprop`)
    fast or its module is optional, and a comment on its line, or above its group of imports,
    says so."""
    silent = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        tree = ast.parse(text)
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                row = node.lineno - 1
                while row > 0 and "#" not in lines[row] and lines[row - 1].strip().startswith(("from ", "import ")):
                    row -= 1  # up through the imports just above it
                said = "#" in lines[row] or (row > 0 and "#" in lines[row - 1])
                if not said and not any("#" in line for line in lines[node.lineno - 1:node.end_lineno]):
                    silent.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert silent == [], "function-local imports with no comment saying why: " + ", ".join(silent)


def test_evaluation_leaves_the_matplotlib_backend_alone(tiny_run: tuple[Path, str]) -> None:
    _, stdout = tiny_run
    assert "BACKEND pdf CODE 0" in stdout


# ---------------------------------------------------------------- one summarize


def test_report_and_summary_print_the_same_plus_minus(tiny_run: tuple[Path, str], tmp_path: Path) -> None:
    root, _ = tiny_run
    assert main(["report", str(root / "eval"), "--out", str(tmp_path / "report")]) == 0
    summary = (root / "eval" / "summary.md").read_text(encoding="utf-8")
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    records = [json.loads(line) for line in (root / "eval" / "results.jsonl").read_text().splitlines()]
    for method in ("gradcam", "gradient"):
        row = next(line for line in summary.splitlines() if line.startswith(f"| {method} |"))
        md = re.findall(r"(\d\.\d{3}) ± (\d\.\d{3})", row)[:3]  # insertion, deletion, id
        cells = re.search(rf'<td data-value="{method}">.*?</tr>', page).group(0)
        html = re.findall(r">(\d\.\d{3})<span class=\"sd\">± (\d\.\d{3})</span>", cells)[:3]
        assert md == html and len(md) == 3
        ids = [r["id"] for r in records if r["method"] == method]
        assert md[2][1] == f"{np.std(ids, ddof=1):.3f}"  # the sample std of the 6 images


def test_a_metric_added_to_the_list_reaches_every_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from relprop.evaluation import metrics, results
    from relprop.report import summarize as report_summarize

    monkeypatch.setitem(metrics.METRICS, "ratio",
                        metrics.Metric("Ratio", "↑", lambda r, i: float(r.insertion[i] / r.deletion[i])))
    records = [{"checkpoint_sha256": "a", "checkpoint": "a.pt", "image": str(i), "method": "m",
                "protocol": "paper", "insertion": 0.5, "deletion": 0.25, "id": 0.25, "ratio": r}
               for i, r in enumerate((1.0, 3.0))]
    summary = results.summarize(records, ["m"], ["paper"])
    assert summary["m"]["ratio"] == pytest.approx(2.0)
    assert summary["m"]["ratio_std"] == pytest.approx(np.std([1.0, 3.0], ddof=1))
    assert "| Ratio ↑ |" in results.summary_markdown(summary, ["paper"])
    columns, rows = report_summarize(records)
    assert "ratio" in columns and rows[0].scores["ratio"] == pytest.approx((2.0, np.sqrt(2.0)))


# ---------------------------------------------------------------- method names


@pytest.mark.parametrize("command", [
    ["explain", "x.png", "--weights", "none.pt"],
    ["evaluate", "--data", ".", "--weights", "none.pt"],
])
def test_an_unknown_method_is_one_line_listing_the_valid_names(command, tmp_path, capsys) -> None:
    from relprop.methods import method_names

    assert main([*command, "--methods", "gradcam,no-such-method", "--out", str(tmp_path / "o")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "'no-such-method'" in lines[0]
    assert all(name in lines[0] for name in method_names())


def test_results_written_under_an_alias_resume_under_the_registry_name(
        tiny_run: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """An old run whose records and run.json say `old-gradcam` resumes as `gradcam`: nothing is
    computed again and the summary lists the registry's name."""
    import shutil

    import relprop.methods

    root, _ = tiny_run
    out = tmp_path / "eval"
    shutil.copytree(root / "eval", out)
    lines = (out / "results.jsonl").read_text().splitlines()
    renamed = [json.dumps({**json.loads(x), "method": "old-" + json.loads(x)["method"]})
               if json.loads(x)["method"] == "gradcam" else x for x in lines]
    (out / "results.jsonl").write_text("\n".join(renamed) + "\n")
    info = json.loads((out / "run.json").read_text())
    info["settings"]["methods"] = ["old-gradcam", "gradient"]
    (out / "run.json").write_text(json.dumps(info))
    monkeypatch.setitem(relprop.methods.ALIASES, "old-gradcam", "gradcam")
    assert main(["evaluate", "--weights", str(root / "tiny.pt"), "--data", str(root / "data"),
                 "--methods", "gradcam,gradient", "--step", "256", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert (out / "results.jsonl").read_text().splitlines() == renamed  # nothing recomputed
    assert "| gradcam |" in (out / "summary.md").read_text()
    assert "different settings" not in capsys.readouterr().err


# ---------------------------------------------------------------- report assets


def test_report_assets_are_package_data(tiny_run: tuple[Path, str], tmp_path: Path) -> None:
    from importlib import resources

    import tomllib

    assets = resources.files("relprop.report")
    script = assets.joinpath("report.js").read_text(encoding="utf-8")
    style = assets.joinpath("report.css").read_text(encoding="utf-8")
    assert "textContent" in script and "font:" in style
    declared = tomllib.loads((SRC.parent / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["relprop.report"]
    assert {"index.html", "report.css", "report.js"} <= set(declared)
    root, _ = tiny_run
    assert main(["report", str(root / "eval"), "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "index.html").read_text(encoding="utf-8")
    assert script in page and style in page and "@@" not in page
    source = (PACKAGE / "report" / "__init__.py").read_text(encoding="utf-8")
    assert "<!DOCTYPE" not in source and "<style>" not in source


# ---------------------------------------------------------------- --help from the registries


@pytest.mark.parametrize("command", ["explain", "evaluate"])
def test_help_lists_the_registry_methods_and_aliases(command, capsys, monkeypatch) -> None:
    import relprop.methods
    from relprop.evaluation.detection import METHODS as DETECTION_METHODS

    monkeypatch.setitem(relprop.methods.ALIASES, "paper-name", "gradcam")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    section = " ".join(text[text.index("\nmethods"):text.index("\nexamples")].split())
    for name in relprop.methods.method_names(include_aliases=True):
        assert re.search(rf"[ :]{re.escape(name)}[,\s]", section + " "), name
    assert re.search(r"aliases: [a-z0-9, -]*paper-name", section)
    if command == "evaluate":
        assert ", ".join(DETECTION_METHODS) in section
