"""Every torchvision classification model and the smallest model of every timm family, explained with
relprop's defaults, one child process per model; the table of docs/models.md and the README's.

    OMP_NUM_THREADS=1 python benchmarks/zoo.py                  # resumable: skips models already done
    python benchmarks/zoo.py --retry-failed                     # again: refused, crashed, timed out
    python benchmarks/zoo.py --only timm/resnet18 'torchvision/vit_*'
    python benchmarks/zoo.py --write-docs                       # docs/models.md and README's block

Models: `torchvision.models.list_models(module=torchvision.models)`; for timm, a family is a module
of `timm.models` (`timm.list_modules()`), and its smallest model is the one with the fewest
parameters counted on the meta device (ties: name order; timm's `test_*` models are left out, and
so are models that ignore `num_classes`, encoders without a head, where the family has a classifier:
gemma4_vit's `_enc` models return tokens, its `gemma4_vit_167m` is the classifier).
That choice is cached in benchmarks/zoo_timm_families.json (`--refresh-families` redoes it).

Each model: random weights (seed 0) with 10 classes, layer scales and zero-initialized gains
redrawn and BatchNorm statistics calibrated on random data (`zoo_common.realistic`), at the
smallest input size it runs at (64, 96, 112, ... px; `img_size`/`image_size` given where the
constructor takes it). Two random images. `LRP(model)` with its defaults: the outcome, the input
total / probability and the worst per-layer total / probability. On piecewise-linear models (ReLU,
max/avg pooling, conv, linear, BatchNorm only), LRP-0 (z-rule, signed split with ε = 0,
winner-takes-all max pooling, logit seed) against gradient × input, with `bn="fold"` (BatchNorms
relprop does not fold get their own z-rule) and with `bn="pass"` (every BatchNorm its z-rule).
Time box: `--timeout` seconds per model (default 120), three times that for models over 100 M
parameters. Results are appended to benchmarks/zoo_results.jsonl
as each model finishes; the last record of a model wins.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_common import (  # noqa: E402
    SOURCES,
    build_model,
    is_classifier,
    meta_model,
    parameter_count,
    pearson,
    realistic,
    verdict,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "zoo_results.jsonl"
FAMILIES = ROOT / "benchmarks" / "zoo_timm_families.json"
DOCS = ROOT / "docs" / "models.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- zoo:begin -->", "<!-- zoo:end -->"
SIZES = (64, 96, 112, 128, 160, 192, 224, 256, 288, 320, 384, 448, 512)
SIZE_KEYWORD = {"timm": "img_size", "torchvision": "image_size"}
IMAGES = 2
BIG = 100_000_000  # parameters above which a model gets three time boxes
TOLERANCE = 0.05  # input total within 5 % of the probability: "explained" in the counts
FAILED = ("refused", "crash", "timeout", "killed")
LRP0_R = 0.999  # LRP-0 vs gradient × input below this on a piecewise-linear model: a suspect

# leaf modules of a piecewise-linear, positively homogeneous network, where LRP-0 = gradient × input
PIECEWISE_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.ReLU,
                    nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                    nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten, nn.ZeroPad2d,
                    nn.Sequential)  # an empty Sequential is a leaf
PIECEWISE_LINEAR_NAMES = {"DropPath", "FastAdaptiveAvgPool", "FastAdaptiveAvgPool2d", "AdaptiveAvgMaxPool2d",
                          "SelectAdaptivePool2d"}


# ---------------------------------------------------------------- which models

def torchvision_models() -> list[str]:
    import torchvision  # deferred: --write-docs needs neither zoo
    return sorted(torchvision.models.list_models(module=torchvision.models))


def timm_families(refresh: bool = False) -> dict[str, dict[str, Any]]:
    """family (timm module) -> its smallest model and its parameter count, cached in FAMILIES."""
    if FAMILIES.exists() and not refresh:
        return json.loads(FAMILIES.read_text())
    import timm  # deferred: optional
    families = {}
    for module in timm.list_modules():
        counts, classifiers = {}, set()
        for name in timm.list_models(module=module):
            if name.startswith("test_"):
                continue
            try:
                model = meta_model("timm", name)
            except Exception as error:  # noqa: BLE001 - a model the meta device cannot build is left out, named
                print(f"timm/{name}: not counted ({type(error).__name__})", file=sys.stderr)
                continue
            counts[name] = sum(p.numel() for p in model.parameters())
            if is_classifier(model):
                classifiers.add(name)
        if classifiers:  # a headless encoder only where the family has nothing else
            counts = {name: count for name, count in counts.items() if name in classifiers}
        if counts:
            name = min(sorted(counts), key=counts.get)
            families[module] = {"model": name, "parameters": counts[name], "models": len(counts)}
    FAMILIES.write_text(json.dumps(families, indent=1) + "\n")
    return families


def all_models(zoo: str | None = None, refresh: bool = False) -> list[tuple[str, str, str]]:
    """(zoo, model, family) in run order: torchvision, then timm's families."""
    models = [("torchvision", name, "") for name in torchvision_models()] if zoo in (None, "torchvision") else []
    if zoo in (None, "timm"):
        models += [("timm", entry["model"], family) for family, entry in sorted(timm_families(refresh).items())]
    return models


# ---------------------------------------------------------------- one model (the child process)

def runs_at(model: nn.Module, size: int) -> bool:
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, size, size))
    except Exception:  # noqa: BLE001 - any failure means: not at this size
        return False
    return True


def build_at_smallest_size(zoo: str, name: str) -> tuple[nn.Module, int, dict[str, int]]:
    torch.manual_seed(0)
    model = build_model(zoo, name)
    takes_size = True
    for size in SIZES:
        if runs_at(model, size):
            return model, size, {}
        if takes_size:
            keyword = {SIZE_KEYWORD[zoo]: size}
            try:
                torch.manual_seed(0)
                sized = build_model(zoo, name, **keyword)
            except TypeError:
                takes_size = False
                continue
            except Exception:  # noqa: BLE001 - the constructor refuses this size: try the next
                continue
            if runs_at(sized, size):
                return sized, size, keyword
    raise RuntimeError(f"runs at none of the sizes {SIZES}")


# functions and tensor methods of a piecewise-linear graph (mul/div only by a number)
PIECEWISE_LINEAR_CALLS = {
    "add", "iadd", "sub", "neg", "cat", "stack", "flatten", "reshape", "view", "permute", "transpose", "contiguous",
    "size", "dim", "getattr", "getitem", "relu", "relu_", "leaky_relu", "max_pool1d", "max_pool2d", "max_pool3d",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
    "mean", "sum", "batch_norm", "conv1d", "conv2d", "conv3d", "linear", "dropout", "chunk", "split", "pad",
    "_assert", "eq", "floordiv", "channel_shuffle", "squeeze", "unsqueeze", "expand", "roll", "narrow", "clone",
    "float", "to", "max_pool2d_with_indices", "mul", "truediv", "floor_divide", "type_as",
    "GoogLeNetOutputs", "InceptionOutputs"}  # torchvision's output tuples
SCALAR_ONLY = {"mul", "truediv"}


def piecewise_linear(model: nn.Module) -> bool:
    """Only ReLU, pooling, conv, linear and BatchNorm: among the leaf modules (and the modules that
    hold parameters themselves), and, where torch.fx traces the model, among the functions and
    methods its forward calls (a softmax inside an attention module's forward is not a module)."""
    for module in model.modules():
        leaf = next(module.children(), None) is None
        holds = any(True for _ in module.parameters(recurse=False))
        if (leaf or holds) and not isinstance(module, PIECEWISE_LINEAR) \
                and type(module).__name__ not in PIECEWISE_LINEAR_NAMES:
            return False
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - untraceable: the module types decide
        return True
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
        if name not in PIECEWISE_LINEAR_CALLS:
            return False
        if name in SCALAR_ONLY and sum(isinstance(a, torch.fx.Node) for a in node.args) > 1:
            return False
    return True


def batchnorm_z_rule() -> Any:
    """LRP-0 on an eval-mode BatchNorm, the affine map y = s·x + t it is: R_x = s·x / y · R (0 where
    y = 0). Keyed by module name it also takes timm's BatchNormAct2d whole (BatchNorm, then a ReLU
    or identity, whose relevance passes)."""
    from relprop.core.numerics import safe_divide  # deferred: relprop is imported in the child
    from relprop.core.rules import Rule

    class BatchNormZ(Rule):
        name = "batchnorm-z"

        def relevance(self, layer: nn.Module, a: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
            scale = torch.rsqrt(layer.running_var + layer.eps)
            if layer.weight is not None:
                scale = scale * layer.weight
            scale = scale.reshape(1, -1, *[1] * (a.dim() - 2))
            y = nn.functional.batch_norm(a, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                                         False, 0.0, layer.eps)
            ratio, _ = safe_divide(R, y)
            return scale * a * ratio

    return BatchNormZ()


def plain_norms(model: nn.Module) -> nn.Module:
    """A copy with each BatchNorm subclass that adds its own steps (timm's BatchNormAct2d: BatchNorm,
    dropout, activation in one forward) split into a plain BatchNorm and those steps, the same
    function. relprop traces into such subclasses, and a rule given by their name does not reach
    the `F.batch_norm` inside (found here: it passes relevance as the identity)."""
    copy = deepcopy(model)
    for name, module in list(copy.named_modules()):
        plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module) in plain:
            continue
        base = next(t for t in plain if isinstance(module, t))
        norm = base(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        norm.load_state_dict({k: v for k, v in module.state_dict().items() if k in norm.state_dict()})
        tail = [getattr(module, part) for part in ("drop", "act") if isinstance(getattr(module, part, None), nn.Module)]
        parent, _, child = name.rpartition(".")
        setattr(copy.get_submodule(parent) if parent else copy, child, nn.Sequential(norm, *tail).eval())
    return copy


def norm_steps(lrp: Any) -> list[tuple[Any, str]]:
    """relprop's plan's BatchNorm steps and their module names: modules, and `F.batch_norm` calls
    inside one (timm's BatchNormAct2d), named by their running mean's module."""
    found = []
    for step in getattr(getattr(lrp, "engine", None), "steps", []):
        if isinstance(getattr(step, "module", None), nn.modules.batchnorm._BatchNorm):
            found.append((step, step.node.target))
        elif step.node.op == "call_function" and step.node.target is torch.nn.functional.batch_norm:
            mean = step.node.args[1] if len(step.node.args) > 1 else step.node.kwargs.get("running_mean")
            if getattr(mean, "op", None) == "get_attr":
                found.append((step, mean.target.rpartition(".")[0]))
    return found


def unfolded_norms(lrp: Any) -> set[str]:
    """The BatchNorms that relprop's bn="fold" did not fold."""
    return {name for step, name in norm_steps(lrp) if getattr(step.info, "folded_into", "") is None}


def missed_folds(lrp: Any) -> list[str]:
    """Unfolded BatchNorms that read a conv/linear output directly: bn="fold" should have folded them
    (unless that output has another reader)."""
    from relprop.core.ops.linear import Linear  # deferred: relprop is imported in the child
    step_of = getattr(lrp.engine, "step_of", {})
    missed = []
    for step, name in norm_steps(lrp):
        source = step.node.args[0] if step.node.args else None
        if getattr(step.info, "folded_into", "") is None and isinstance(getattr(step_of.get(source), "op", None), Linear):
            readers = [user for user in source.users if getattr(step_of.get(user), "op", None) is not None]
            missed.append(f"{name} (conv output read by {len(readers)})")
    return missed


def lrp0_against_gradient(model: nn.Module, x: torch.Tensor, bn: str) -> dict[str, Any]:
    """LRP-0 as tests/test_lrp0_gradient.py configures it, against gradient × input (Ancona et al.
    2018). LRP-0 treats a BatchNorm as the affine layer it is (its shift absorbs relevance, as a
    bias does). bn="fold": relprop folds each BatchNorm into the conv/linear before or after it;
    those it does not fold get `batchnorm_z_rule` by name. bn="pass": every BatchNorm gets it."""
    from relprop import LRP  # deferred: the child imports relprop after its environment is set
    from relprop.core.rules import EpsilonRule
    from relprop.core.splitting import SignedSplit
    result: dict[str, Any] = {}
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) not in (nn.BatchNorm1d, nn.BatchNorm2d,
                                                                              nn.BatchNorm3d) for m in model.modules()):
        model, result["norms"] = plain_norms(model), "BatchNorm subclasses split into BatchNorm + activation"
    inputs = x.clone().requires_grad_(True)
    logits = model(inputs)
    explained = logits.argmax(1, keepdim=True)
    (gradient,) = torch.autograd.grad(logits.gather(1, explained).sum(), inputs)
    seed = torch.zeros_like(logits).scatter(1, explained, logits.gather(1, explained)).detach()
    z = EpsilonRule(0.0)
    rules: dict[Any, Any] = {nn.Conv1d: z, nn.Conv2d: z, nn.Conv3d: z, nn.Linear: z}
    norm_z = batchnorm_z_rule()
    norms = {name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    held: dict[str, Any] = {}

    def explain(names: set[str]) -> None:
        held["lrp"] = LRP(model, rules=rules | dict.fromkeys(names, norm_z), input_rule=z,
                          split=SignedSplit(epsilon=0.0), maxpool="wta", bn=bn)
        held["R"] = held["lrp"].attribute(x, target=seed)

    outcome, detail = verdict(lambda: explain(norms if bn == "pass" else set()))
    if bn == "fold" and outcome == "explained" and unfolded_norms(held["lrp"]):
        unfolded = unfolded_norms(held["lrp"])
        result["unfolded"] = len(unfolded)
        outcome, detail = verdict(lambda: explain(unfolded))
    result.update(outcome=outcome, detail=detail)
    if outcome != "explained":
        return result
    expected = (gradient * x).detach()
    R = held["R"]
    r = min(pearson(R[i], expected[i]) for i in range(x.shape[0]))
    error = float((R - expected).abs().max() / expected.abs().max())
    return result | {"r": r, "max_rel_error": error}


def measure(zoo: str, name: str, out: Path) -> None:
    """The record of one model, written to `out` after each stage (a timeout keeps what was done)."""
    from relprop import LRP  # deferred: the child imports relprop after its environment is set
    record: dict[str, Any] = {"zoo": zoo, "model": name}

    def save() -> None:
        out.write_text(json.dumps(record))

    try:
        model, size, keyword = build_at_smallest_size(zoo, name)
    except Exception as error:  # noqa: BLE001 - the model's own failure, not relprop's
        record.update(outcome="cannot run", detail=f"{type(error).__name__}: {str(error).strip()[:200]}")
        save()
        return
    record.update(size=size, size_keyword=keyword, parameters=sum(p.numel() for p in model.parameters()))
    record.update(realistic(model, (3, size, size)))
    x = torch.randn(IMAGES, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probability = torch.softmax(model(x), 1).max(1).values
    held: dict[str, Any] = {}

    def run() -> None:
        held["lrp"] = LRP(model)
        held["R"], held["sums"] = held["lrp"].attribute(x, return_layer_sums=True)

    start = time.perf_counter()
    outcome, detail = verdict(run)
    record.update(outcome=outcome, detail=detail, seconds=round(time.perf_counter() - start, 2))
    if "lrp" in held:
        record["capture_path"] = getattr(held["lrp"], "capture_path", "fx")
    if outcome == "explained":
        ratio = held["R"].flatten(1).sum(1) / probability
        record["total_over_p"] = [float(v) for v in ratio]
        cuts = {cut: float((total / probability - 1).abs().max()) for cut, total in held["sums"].items()}
        worst = max(cuts, key=lambda cut: cuts[cut] if math.isfinite(cuts[cut]) else math.inf)
        record.update(worst_layer=worst, worst_layer_deviation=cuts[worst], cuts=len(cuts))
    record["piecewise_linear"] = outcome == "explained" and piecewise_linear(model)
    save()
    if record.get("batchnorms") and outcome == "explained":
        folding: dict[str, Any] = {}

        def fold() -> None:
            folding["lrp"] = LRP(model, rules={nn.Conv2d: "epsilon", nn.Linear: "epsilon"}, bn="fold")
            folding["lrp"].attribute(x)

        if verdict(fold)[0] == "explained":
            missed = missed_folds(folding["lrp"])
            record.update(bn_fold_missed=len(missed), bn_fold_missed_example=missed[:1])
            save()
    if record["piecewise_linear"]:
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        for bn in ("fold", "pass") if has_bn else ("fold",):
            record[f"lrp0_{bn}"] = lrp0_against_gradient(model, x, bn)
            save()
        if not has_bn:
            record["lrp0_pass"] = record["lrp0_fold"]
            save()


# ---------------------------------------------------------------- the run (the parent process)

def read_results(path: Path = RESULTS) -> dict[str, dict[str, Any]]:
    """zoo/model -> its last record."""
    results: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                results[f"{record['zoo']}/{record['model']}"] = record
    return results


def run_child(zoo: str, name: str, family: str, timeout: float) -> dict[str, Any]:
    """One model in its own process: a crash, an OOM kill or a hang costs only this model."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "record.json"
        start = time.perf_counter()
        try:
            completed = subprocess.run([sys.executable, __file__, "--child", f"{zoo}/{name}", "--record", str(out)],
                                       env=env, capture_output=True, text=True, timeout=timeout)
            status, tail = completed.returncode, completed.stderr.strip().splitlines()[-1:]
        except subprocess.TimeoutExpired:
            status, tail = None, []
        record = json.loads(out.read_text()) if out.exists() else {"zoo": zoo, "model": name}
    record.update(family=family, wall_seconds=round(time.perf_counter() - start, 1), timeout=timeout,
                  commit=source_commit())
    if status is None:
        stage = "LRP-0" if "outcome" in record else "building or explaining"
        record.setdefault("outcome", "timeout")
        record["timed_out"] = f"{stage}, after {timeout:.0f} s"
    elif status != 0 and "outcome" not in record:
        record.update(outcome="killed", detail=f"exit status {status}: {' '.join(tail)[:200]}")
    return record


def source_commit() -> str:
    """The commit the measured tree is at ('+' when it has uncommitted changes)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain", "--", "src") else "")


def time_box(zoo: str, name: str, base: float) -> float:
    try:
        return base * (3 if parameter_count(zoo, name) > BIG else 1)
    except Exception:  # noqa: BLE001 - cannot count: the child will say why
        return base


def selected(models: list[tuple[str, str, str]], args: argparse.Namespace) -> list[tuple[str, str, str]]:
    done = read_results(args.results)
    chosen = []
    for zoo, name, family in models:
        key = f"{zoo}/{name}"
        if args.zoo and zoo != args.zoo:
            continue
        if args.only:
            if any(fnmatch.fnmatch(key, pattern) or pattern in (name, family, f"{zoo}/{family}")
                   for pattern in args.only):
                chosen.append((zoo, name, family))
            continue
        record = done.get(key)
        if record is None or (args.retry_failed and record.get("outcome") in FAILED) \
                or (args.rerun_explained and record.get("outcome") == "explained"):
            chosen.append((zoo, name, family))
    return chosen


def run(args: argparse.Namespace) -> None:
    models = selected(all_models(args.zoo, args.refresh_families), args)
    print(f"{len(models)} models to run", flush=True)
    lock = threading.Lock()

    def one(entry: tuple[str, str, str]) -> None:
        zoo, name, family = entry
        record = run_child(zoo, name, family, time_box(zoo, name, args.timeout))
        with lock, args.results.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(f"{zoo}/{name}: {summary_cell(record)} ({record['wall_seconds']} s)", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, models))


# ---------------------------------------------------------------- the docs

def total_ok(record: dict[str, Any]) -> bool:
    totals = record.get("total_over_p") or []
    return record.get("outcome") == "explained" and bool(totals) \
        and all(math.isfinite(t) and abs(t - 1) <= TOLERANCE for t in totals)


def summary_cell(record: dict[str, Any]) -> str:
    outcome = record.get("outcome", "?")
    if outcome == "explained":
        totals = record.get("total_over_p", [])
        worst = max(totals, key=lambda t: abs(t - 1)) if totals else float("nan")
        return f"explained, total/p {worst:.5f}"
    return f"{outcome}: {record.get('detail', record.get('timed_out', ''))}"


def lrp0_cell(record: dict[str, Any]) -> str:
    if not record.get("piecewise_linear"):
        return ""
    cells = []
    for bn in ("fold", "pass"):
        result = record.get(f"lrp0_{bn}")
        if result is None:
            cells.append(f"{bn}: not run")
        elif result["outcome"] == "explained":
            low = not result["r"] >= LRP0_R
            cells.append(f"{bn}: **{result['r']:.5f}**" if low else f"{bn}: {result['r']:.5f}")
        else:
            cells.append(f"{bn}: {result['outcome']}")
    return "; ".join(cells)


def suspicion(record: dict[str, Any]) -> str:
    """Why a record needs a look ('' if it does not): a crash, a total off, LRP-0 off."""
    if record.get("outcome") in ("crash", "killed"):
        return f"{record['outcome']}: {record.get('detail', '')}"
    if record.get("outcome") == "explained" and not total_ok(record):
        return f"input total / p = {record.get('total_over_p')}"
    low = [f"{bn}: r = {result['r']:.5f}" for bn in ("fold", "pass")
           for result in [record.get(f"lrp0_{bn}") or {}] if result.get("outcome") == "explained"
           and not result["r"] >= LRP0_R]
    failed = [f"{bn}: {result['outcome']} ({result.get('detail', '')})" for bn in ("fold", "pass")
              for result in [record.get(f"lrp0_{bn}") or {}] if result.get("outcome") in ("crash", "refused")]
    return "LRP-0 vs gradient × input " + "; ".join(low + failed) if low or failed else ""


def lrp0_rs(records: list[dict[str, Any]], bn: str) -> list[float]:
    return [r[f"lrp0_{bn}"]["r"] for r in records
            if r.get("piecewise_linear") and r.get(f"lrp0_{bn}", {}).get("outcome") == "explained"]


def message_group(detail: str) -> str:
    """A refusal's message with the model-specific parts (its class, node and module names, sizes)
    elided, so that one cause (the op, the module type) is one group."""
    text = re.sub(r"\(node '[^']*'( in module '[^']*')?\)", "", detail)
    text = re.sub(r"(module|node) '[^']*'", r"\1 …", text)
    text = re.sub(r"^cannot trace \w+", "cannot trace …", text)
    text = re.sub(r"'(\w+)_\d+'", r"'\1'", text)
    return re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)


def counts(records: dict[str, dict[str, Any]], zoo: str) -> tuple[int, int]:
    chosen = [r for r in records.values() if r["zoo"] == zoo]
    return sum(total_ok(r) for r in chosen), len(chosen)


def outcome_counts(records: list[dict[str, Any]]) -> str:
    tally: dict[str, int] = defaultdict(int)
    for record in records:
        tally[record.get("outcome", "?")] += 1
    return ", ".join(f"{n} {outcome}" for outcome, n in sorted(tally.items(), key=lambda kv: -kv[1]))


def docs_text(records: dict[str, dict[str, Any]]) -> str:
    lines = ["# Models: every torchvision classifier, the smallest model of every timm family", "",
             "Generated by `python benchmarks/zoo.py --write-docs` from `benchmarks/zoo_results.jsonl`; how the",
             "models are chosen, initialized and measured: the docstring of `benchmarks/zoo.py`. Random weights",
             "(BatchNorm calibrated, layer scales redrawn), two random images at the smallest size each model",
             "runs at, `LRP(model)` with its defaults. \"total/p\": the input relevance total over the explained",
             f"probability, the worst of the images; counted as explained when within {TOLERANCE:.0%}. \"layers\":",
             "the worst |total/p − 1| over every reported cut. \"LRP-0 r\": on piecewise-linear models, the",
             "Pearson r (worst image) of LRP-0 and gradient × input, with `bn=\"fold\"` and `bn=\"pass\"`.",
             "\"path\": how relprop captured the model (`fx`: symbolic tracing; `concrete`: traced with the",
             "example input's values, per input shape). Time box per model: 120–150 s, 3× over 100 M parameters.", ""]
    lines += summary_lines(records) + [""]
    suspects = [(r, why) for r in sorted(records.values(), key=lambda r: (r["zoo"], r["model"]))
                for why in [suspicion(r)] if why]
    lines += ["## Suspects: crashes, totals off, LRP-0 ≠ gradient × input", ""]
    lines += [f"- {r['zoo']}/{r['model']}: {why}" for r, why in suspects] or ["none"]
    lines.append("")
    for zoo in SOURCES:
        chosen = sorted((r for r in records.values() if r["zoo"] == zoo), key=lambda r: r["model"])
        lines += [f"## {zoo}", "", outcome_counts(chosen), "",
                  "| model | family | M params | px | outcome | total/p | layers | LRP-0 r | path | s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in chosen:
            totals = r.get("total_over_p") or []
            worst = f"{max(totals, key=lambda t: abs(t - 1)):.5f}" if totals else ""
            layers = f"{r['worst_layer_deviation']:.1e}" if "worst_layer_deviation" in r else ""
            outcome = r.get("outcome", "?")
            if outcome == "explained" and not total_ok(r):
                outcome = "**explained, total off**"
            elif outcome in ("crash", "killed"):
                outcome = f"**{outcome}**"
            millions = f"{r['parameters'] / 1e6:.1f}" if "parameters" in r else ""
            lines.append(f"| {r['model']} | {r.get('family', '')} | {millions} | {r.get('size', '')} | {outcome} | {worst} | "
                         f"{layers} | {lrp0_cell(r)} | {r.get('capture_path', '')} | {r.get('seconds', '')} |")
        lines.append("")
    missed = sorted((r for r in records.values() if r.get("bn_fold_missed")), key=lambda r: r["model"])
    if missed:
        lines += ["## `bn=\"fold\"` leaves BatchNorms unfolded that read a conv's output", "",
                  "BatchNorms right after a conv/linear layer that relprop's `bn=\"fold\"` did not fold (the",
                  "ε, γ, αβ rules then see the unfolded layer). \"read by 3\": the conv's output is also read by",
                  "the `_assert(x.ndim == 4)` of timm's BatchNormAct2d, so the fold's one-reader test fails.", ""]
        lines += [f"- {r['zoo']}/{r['model']}: {r['bn_fold_missed']}, e.g. {r['bn_fold_missed_example'][0]}"
                  for r in missed]
        lines.append("")
    lines += ["## Refusals, crashes and time-outs by cause", ""]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records.values():
        if r.get("outcome") not in ("explained",):
            detail = r.get("detail") or r.get("timed_out", "")
            groups[(r.get("outcome", "?"), message_group(detail))].append(r)
    for (outcome, _), members in sorted(groups.items(), key=lambda kv: (kv[0][0], -len(kv[1]), kv[0][1])):
        names = ", ".join(f"{r['zoo']}/{r['model']}" for r in sorted(members, key=lambda r: r["model"]))
        example = members[0].get("detail") or members[0].get("timed_out", "")
        lines.append(f"- **{outcome}** ({len(members)}): {names}  ")
        lines.append(f"  e.g. `{example.replace('`', chr(39))}`")
    return "\n".join(lines) + "\n"


def summary_lines(records: dict[str, dict[str, Any]]) -> list[str]:
    tv, tv_n = counts(records, "torchvision")
    tm, tm_n = counts(records, "timm")
    pl = [r for r in records.values() if r.get("piecewise_linear")]
    lines = ["| zoo | explained, total within 5 % | outcomes |", "|---|---|---|",
             f"| torchvision classification models | {tv} of {tv_n} | "
             f"{outcome_counts([r for r in records.values() if r['zoo'] == 'torchvision'])} |",
             f"| timm families (smallest model each) | {tm} of {tm_n} | "
             f"{outcome_counts([r for r in records.values() if r['zoo'] == 'timm'])} |", ""]
    for bn in ("fold", "pass"):
        rs = lrp0_rs(pl, bn)
        low = min(rs, key=lambda r: r if math.isfinite(r) else -math.inf) if rs else float("nan")
        agree = sum(r >= LRP0_R for r in rs)
        lines.append(f"LRP-0 = gradient × input, `bn=\"{bn}\"`: r ≥ {LRP0_R} on {agree} of {len(pl)} "
                     f"piecewise-linear models, minimum r = {low:.5f}.  ")
    return lines


def readme_block(records: dict[str, dict[str, Any]]) -> str:
    return "\n".join([BEGIN, "", *summary_lines(records), "",
                      "Per model, and every refusal with its one line: [docs/models.md](docs/models.md)",
                      "(`python benchmarks/zoo.py`, then `--write-docs`).", "", END])


def with_readme_block(text: str, block: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + block + text[end:]


def write_docs(results: Path = RESULTS) -> None:
    records = read_results(results)
    DOCS.write_text(docs_text(records))
    README.write_text(with_readme_block(README.read_text(), readme_block(records)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", help="zoo/model patterns, model or family names (run even if done)")
    parser.add_argument("--zoo", choices=SOURCES)
    parser.add_argument("--retry-failed", action="store_true", help="rerun refused, crashed, timed-out models")
    parser.add_argument("--rerun-explained", action="store_true", help="rerun explained models (after a change)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per model (3x over 100 M parameters)")
    parser.add_argument("--jobs", type=int, default=1, help="models at once (each its own process)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--refresh-families", action="store_true", help="recount timm's families' smallest models")
    parser.add_argument("--write-docs", action="store_true", help="write docs/models.md and README's block; no run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import warnings
        warnings.filterwarnings("ignore")
        zoo, name = args.child.split("/", 1)
        measure(zoo, name, args.record)
    elif args.write_docs:
        write_docs(args.results)
    else:
        run(args)


if __name__ == "__main__":
    main()
