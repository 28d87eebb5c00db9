"""Fault injection on `relprop evaluate`'s files: kill -9 at every point where the torn-line repair,
a map write or a run.json write changes the disk; a full disk (a file-size limit, RLIMIT_FSIZE,
in a subprocess that ignores SIGXFSZ, so writes fail with EFBIG as they fail with ENOSPC on a full
disk); kill -9 of a real run at random moments; two runs on one folder; a killed torchrun rank and
a killed launcher. Each checks the invariant: every row that was on disk before is still there,
exactly once, and a resume finishes the job with the numbers of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from relprop.cli.main import main
from relprop.errors import DiskFullError
from relprop.evaluation import results

from sharedfiles import copy_tin10_val, shared_path

SRC = Path(__file__).resolve().parents[1] / "src"
IMAGES = {"n01443537": ["val_1230.JPEG", "val_1284.JPEG"], "n01882714": ["val_1083.JPEG"]}
KEY = ("image", "method", "protocol")
# The builtins through which Python code changes a file: a kill before each of them, in turn,
# is a kill at every point where the disk changes.
MUTATIONS = {"open", "write", "pwrite", "truncate", "ftruncate", "replace", "rename", "unlink",
             "fsync", "tofile", "write_bytes", "write_text"}


def _kill_before_call(k: int, action: Callable[[], object]) -> str:
    """Run `action` in a forked child that SIGKILLs itself just before its k-th call to a
    file-changing builtin: 'killed', 'done' (fewer than k such calls) or 'error'."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        count = 0

        def profile(frame, event, arg):
            nonlocal count
            if event == "c_call" and getattr(arg, "__name__", "") in MUTATIONS:
                count += 1
                if count == k:
                    os.kill(os.getpid(), signal.SIGKILL)

        code = 1
        try:
            sys.setprofile(profile)
            action()
            code = 0
        finally:
            sys.setprofile(None)
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "killed"
    return "done" if os.WEXITSTATUS(status) == 0 else "error"


def _every_kill(action: Callable[[], object], reset: Callable[[], None],
                check: Callable[[], None]) -> int:
    """Kill `action` before each of its file-changing calls in turn, checking after each kill;
    returns how many points were tried."""
    for k in range(1, 200):
        reset()
        outcome = _kill_before_call(k, action)
        assert outcome != "error", f"the action failed on its own (kill point {k})"
        check()
        if outcome == "done":
            return k - 1
    raise AssertionError("more than 200 file-changing calls")


def test_kill_9_anywhere_in_the_torn_line_repair_loses_no_row(tmp_path):
    rows = [{"image": f"{i}.png", "method": "m", "protocol": "paper", "id": i / 100,
             "insertion_curve": [0.5] * 200} for i in range(300)]
    whole = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path = tmp_path / "results.jsonl"

    def reset():
        path.write_bytes(whole + b'{"image": "cut by a kill')

    def check():
        assert path.read_bytes() in (whole, whole + b'{"image": "cut by a kill')

    points = _every_kill(lambda: results.read_rows(tmp_path, repair=path), reset, check)
    assert points >= 1 and path.read_bytes() == whole


def test_kill_9_anywhere_in_a_run_json_or_map_write_leaves_the_old_or_the_new_file(tmp_path):
    record, old_info, new_info = tmp_path / "run.json", {"settings": {"a": 1}}, {"settings": {"a": 2}}

    def reset_info():
        record.write_text(json.dumps(old_info))

    def check_info():
        assert results.read_run_info(record) in (old_info, new_info)

    assert _every_kill(lambda: results.write_run_info(record, new_info), reset_info, check_info) >= 3

    heat = tmp_path / "maps" / "m" / "a.npy"
    old, new = np.zeros((300, 300), np.float32), np.ones((300, 300), np.float32)

    def reset_map():
        heat.parent.mkdir(parents=True, exist_ok=True)
        np.save(heat, old)

    def check_map():
        assert results.map_is_whole(heat)
        assert np.load(heat).mean() in (0.0, 1.0)

    assert _every_kill(lambda: results.save_map(heat, new), reset_map, check_map) >= 3
    left = [p for p in tmp_path.rglob("*") if p.is_file() and p.name not in ("a.npy", "run.json")]
    assert left and all(p.match(results.TEMPORARY) for p in left)  # by the killed writers
    assert results.remove_temporaries(tmp_path) == len(left)  # what a run does under its lock


# ---------------------------------------------------------------- real runs in subprocesses


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return copy_tin10_val(tmp_path_factory.mktemp("data"), IMAGES)


def _command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "relprop", "evaluate",
            "--weights", str(shared_path("models", "resnet18_tin10.pt")), "--data", str(data),
            "--methods", "gradient,ours", "--protocol", "paper,rise", "--step", "6000",
            "--batch-size", "1", "--device", "cpu", "--out", str(out), *extra]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


def _lines(out: Path) -> list[bytes]:
    """Every whole line of every results file."""
    return [line for path in sorted(out.glob("results*.jsonl"))
            for line in path.read_bytes().split(b"\n")[:-1]]


def _rows(out: Path) -> dict[tuple, dict]:
    rows = [json.loads(line) for line in _lines(out)]
    keyed = {tuple(r[k] for k in KEY): r for r in rows}
    assert len(keyed) == len(rows), "a row is on disk twice"
    return keyed


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("checkpoint", "input")}


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    done = subprocess.run(_command(dataset, out), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return _rows(out)


def _same_as(reference: dict, out: Path) -> None:
    rows = _rows(out)
    assert rows.keys() == reference.keys()
    for key, row in rows.items():
        assert _numbers(row) == _numbers(reference[key]), key


def _in_process(command: list[str]) -> int:
    """The command run here (no second start of Python and torch), on one thread as the
    subprocesses (float sums depend on the thread count)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(command[3:])
    finally:
        torch.set_num_threads(threads)


def _limited(limit: int) -> Callable[[], None]:
    def start() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return start


def test_a_full_disk_is_one_line_and_the_same_command_resumes(reference, dataset, tmp_path):
    out = tmp_path / "full"
    full = subprocess.run(_command(dataset, out), env=_env(), capture_output=True, text=True,
                          timeout=600, preexec_fn=_limited(6000))
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 1, full.stderr[-2000:]
    assert lines[-1].startswith("relprop evaluate: error: no space left on device writing ")
    assert "results.jsonl; free space and rerun the same command to resume" in lines[-1]
    assert "Traceback" not in full.stderr
    before = _lines(out)
    assert 0 < len(before) < len(reference)
    assert (out / "results.jsonl").read_bytes().endswith(b"\n")  # the failed line was cut back
    info = (out / "run.json").read_bytes()

    again = subprocess.run(_command(dataset, out), env=_env(), capture_output=True, text=True,
                           timeout=600, preexec_fn=_limited(len(info) // 2))
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1].startswith(
        f"relprop evaluate: error: no space left on device writing {out / 'run.json'}; ")
    assert (out / "run.json").read_bytes() == info  # not cut at the limit: the old file, whole

    assert _in_process(_command(dataset, out, "--save-maps")) == 0  # the same command, more space
    assert _lines(out)[:len(before)] == before
    _same_as(reference, out)
    assert len(list((out / "maps").rglob("*.npy"))) == 6
    assert all(results.map_is_whole(p) for p in (out / "maps").rglob("*.npy"))
    assert not list(out.rglob(results.TEMPORARY))


def test_a_map_write_on_a_full_disk_is_one_line_and_leaves_no_file(tmp_path):
    heat = tmp_path / "maps" / "m" / "a.npy"

    def write() -> None:
        _limited(1000)()
        with pytest.raises(DiskFullError, match=f"^no space left on device writing {heat}; free "):
            results.save_map(heat, np.ones((100, 100), np.float32))

    assert _kill_before_call(0, write) == "done"
    assert not heat.exists() and not list(tmp_path.rglob(results.TEMPORARY))


def test_kill_9_at_random_moments_then_resume(reference, dataset, tmp_path):
    out, generator = tmp_path / "killed", random.Random(0)
    for _ in range(1):
        before = _lines(out) if out.exists() else []
        process = subprocess.Popen(_command(dataset, out, "--save-maps"), env=_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None and \
                len(_lines(out) if out.exists() else []) <= len(before):
            time.sleep(0.02)  # until this run has written a row of its own
        time.sleep(generator.uniform(0, 0.5))
        process.kill()
        process.wait()
        after = _lines(out)
        assert after[:len(before)] == before  # every row on disk before is there, once
        _rows(out)
    assert _in_process(_command(dataset, out, "--save-maps")) == 0
    _same_as(reference, out)
    assert all(results.map_is_whole(p) for p in (out / "maps").rglob("*.npy"))
    assert not list(out.rglob(results.TEMPORARY))


def test_two_runs_on_one_folder_write_each_row_once(reference, dataset, tmp_path):
    out = tmp_path / "two"
    processes = [subprocess.Popen(_command(dataset, out), env=_env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [(p.wait(timeout=600), p.stderr.read()) for p in processes]
    for code, err in outcomes:
        assert code == 0 or (code == 1 and "is in use by another relprop evaluate (pid " in err), err
    _same_as(reference, out)  # each key once, whoever wrote it


# ---------------------------------------------------------------- the torchrun launcher


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pids: list[int]) -> list[int]:
    import psutil

    return [p for p in pids if psutil.pid_exists(p) and
            psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def _launched(data: Path, out: Path) -> subprocess.Popen:
    command = _command(data, out, "--launcher", "torchrun", "--nproc-per-node", "2")
    return subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_rows(out: Path, rows: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and len(_lines(out)) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError("the sharded run wrote no rows")


def test_a_killed_rank_says_rerun_and_exits_4_and_a_killed_launcher_leaves_no_rank(
        reference, dataset, tmp_path):
    out = tmp_path / "sharded"
    launcher = _launched(dataset, out)
    _wait_for_rows(out, 1, launcher)
    ranks = _descendants(launcher.pid)
    rank = next(p for p in ranks if b"relprop" in Path(f"/proc/{p}/cmdline").read_bytes()
                and b"torch.distributed.run" not in Path(f"/proc/{p}/cmdline").read_bytes())
    os.kill(rank, signal.SIGKILL)
    code = launcher.wait(timeout=120)
    err = launcher.stderr.read()
    assert code == 4, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("relprop evaluate: a process of the sharded run died")
    assert "rerun the same command" in err
    _rows(out)

    launcher = _launched(dataset, out)
    _wait_for_rows(out, len(_lines(out)) + 1, launcher)
    children = _descendants(launcher.pid)
    assert len(children) >= 3  # torchrun and its two ranks
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 60
    while _alive(children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(children), "ranks outlived the killed launcher"
    assert _in_process(_command(dataset, out)) == 0
    _same_as(reference, out)
