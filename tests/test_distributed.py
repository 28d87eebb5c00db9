"""`relprop evaluate` sharded with torch.distributed (gloo on the CPU): 2 processes give the numbers
of 1, a kill -9 leaves no partial line and a resume neither redoes nor loses a row, also when the
resumed run has another number of processes (2 -> 1, 1 -> 2).

Every run is a subprocess with OMP_NUM_THREADS=1 (what torchrun sets per worker), because float
reductions, such as the conservation sums, depend on the number of threads.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sharedfiles import copy_tin10_val, shared_path

SRC = Path(__file__).resolve().parents[1] / "src"
IMAGES = {"n01443537": ["val_1230.JPEG", "val_1284.JPEG"], "n01882714": ["val_1083.JPEG"]}
KEY = ("image", "method", "protocol")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = copy_tin10_val(tmp_path_factory.mktemp("data"), IMAGES)
    return root


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", **extra)
    return env


def _command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "relprop", "evaluate",
            "--weights", str(shared_path("models", "resnet18_tin10.pt")), "--data", str(data),
            "--methods", "gradcam,ours", "--protocol", "paper", "--step", "3000",
            "--batch-size", "1", "--device", "cpu", "--out", str(out), *extra]


def _run(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(data, out, *extra), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _lines(out: Path) -> list[str]:
    return [line for path in sorted(out.glob("results*.jsonl"))
            for line in path.read_text().splitlines()]


def _rows(out: Path) -> dict[tuple, dict]:
    """The union of every results file, checked for duplicates and partial lines."""
    rows = [json.loads(line) for line in _lines(out)]  # a partial line would not parse
    keyed = {tuple(r[k] for k in KEY): r for r in rows}
    assert len(keyed) == len(rows), "a row was written twice"
    return keyed


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "checkpoint"}


@pytest.fixture(scope="module")
def single(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _run(dataset, out)
    rows = _rows(out)
    assert len(rows) == 3 * 2  # images x methods (one protocol)
    return out, rows


def _kill_after_rows(process: subprocess.Popen, out: Path, rows: int, pattern: str = "results*.jsonl",
                     others: tuple[subprocess.Popen, ...] = ()) -> None:
    """SIGKILL `process` (then `others`) as soon as `rows` whole rows are on disk."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = sum(p.read_bytes().count(b"\n") for p in out.glob(pattern))
        if found >= rows or process.poll() is not None:
            break
        time.sleep(0.05)
    for victim in (process, *others):
        if victim.poll() is None:
            os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)


def test_two_gloo_processes_give_the_numbers_of_one(single, dataset, tmp_path):
    _, reference = single
    out = tmp_path / "two"
    _run(dataset, out, "--launcher", "torchrun", "--nproc-per-node", "2")
    assert sorted(p.name for p in out.glob("results*.jsonl")) == ["results.rank0.jsonl",
                                                                  "results.rank1.jsonl"]
    rows = _rows(out)
    assert rows.keys() == reference.keys()
    for key, row in rows.items():
        assert _numbers(row) == _numbers(reference[key]), key  # byte-identical numbers
    assert (out / "summary.md").read_text() == (single[0] / "summary.md").read_text()


def test_kill_9_then_resume_loses_and_redoes_nothing(single, dataset, tmp_path):
    _, reference = single
    out = tmp_path / "killed"
    process = subprocess.Popen(_command(dataset, out), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _kill_after_rows(process, out, 3)
    assert process.returncode == -signal.SIGKILL
    before = _lines(out)
    assert 0 < len(before) < len(reference)
    assert (out / "results.jsonl").read_bytes().endswith(b"\n")  # no partial line
    _run(dataset, out)
    after = _lines(out)
    assert after[:len(before)] == before  # kept, not recomputed
    rows = _rows(out)
    assert rows.keys() == reference.keys()
    for key, row in rows.items():
        assert _numbers(row) == _numbers(reference[key]), key


def test_resume_from_one_process_with_two(single, dataset, tmp_path):
    _, reference = single
    out = tmp_path / "one-then-two"
    process = subprocess.Popen(_command(dataset, out), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _kill_after_rows(process, out, 2)
    before = set(_rows(out))
    assert 0 < len(before) < len(reference)
    _run(dataset, out, "--launcher", "torchrun", "--nproc-per-node", "2")
    written = [json.loads(line) for p in out.glob("results.rank*.jsonl") for line in p.open()]
    assert not before & {tuple(r[k] for k in KEY) for r in written}  # nothing redone
    rows = _rows(out)
    assert rows.keys() == reference.keys()
    for key, row in rows.items():
        assert _numbers(row) == _numbers(reference[key]), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dying_rank_then_resume_with_one_process(single, dataset, tmp_path):
    """Two ranks started by hand (as torchrun does); rank 1 is killed with SIGKILL after its first
    row, rank 0 after it (torchrun stops the others); one process then finishes the job."""
    _, reference = single
    out = tmp_path / "two-then-one"
    port = str(_free_port())
    ranks = [subprocess.Popen(_command(dataset, out), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    _kill_after_rows(ranks[1], out, 1, pattern="results.rank1.jsonl", others=(ranks[0],))
    before = _rows(out)
    assert 0 < len(before) < len(reference)
    for path in out.glob("results.rank*.jsonl"):
        assert path.read_bytes().endswith(b"\n")
    _run(dataset, out)
    rows = _rows(out)
    assert rows.keys() == reference.keys()
    for key, row in rows.items():
        assert _numbers(row) == _numbers(reference[key]), key
