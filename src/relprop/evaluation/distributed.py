"""Sharding `relprop evaluate` over processes with `torch.distributed` (launched by torchrun).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is one process and nothing
here starts a process group. The work is split without communication: the sorted image list is cut
into fixed batches of `--batch-size` images (the same batches whatever the world size, so every
image is computed in the same company and a sharded run gives the single process's numbers), and
batch b goes to rank b mod world. Each rank appends to its own results file; the process group is
used only to agree on the run's settings before the work and to gather the outcome after it (on
a gloo group with a long timeout, as ranks may finish hours apart on an uneven resume).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from relprop.errors import InputError

T = TypeVar("T")
WAIT = timedelta(days=7)  # a rank done early waits this long for the others at the end
JOIN_TIMEOUT_ENV = "RELPROP_DIST_JOIN_TIMEOUT"  # seconds a rank waits for the others to join


def join_timeout() -> timedelta:
    """How long a rank waits for all ranks to join at the start (default 120 s; torchrun starts
    them together): leftover RANK/WORLD_SIZE variables fail fast instead of waiting 7 days."""
    try:
        seconds = float(os.environ.get(JOIN_TIMEOUT_ENV, "120"))
    except ValueError:
        raise InputError(f"{JOIN_TIMEOUT_ENV} must be a number of seconds") from None
    return timedelta(seconds=max(seconds, 1.0))


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the job: its rank, the world size, its rank on this node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """torchrun's variables (one process when absent)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise InputError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets "
                             "them); unset them to run one process") from None
        if world < 1 or not 0 <= rank < world:
            raise InputError(f"RANK {rank} with WORLD_SIZE {world}: rank must be in [0, world)")
        if world > 1:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
            if missing:
                raise InputError(f"RANK={rank} and WORLD_SIZE={world} are set but {' and '.join(missing)} "
                                 "not: leftover torchrun variables? unset RANK, WORLD_SIZE and "
                                 "LOCAL_RANK to run one process, or start the job with torchrun")
        return cls(rank, world, local)

    def shard(self, batches: Sequence[T]) -> list[T]:
        """This rank's batches: b mod world == rank (deterministic, balanced to one batch)."""
        return [b for i, b in enumerate(batches) if i % self.world == self.rank]

    def device(self, device: torch.device) -> torch.device:
        """One device per local rank: `cuda` becomes cuda:LOCAL_RANK (mod the GPU count, so two
        ranks may share one GPU); a CPU stays the CPU."""
        if self.world == 1 or device.type != "cuda":
            return device
        if device.index is not None:
            raise InputError(f"--device {device}: with torchrun each rank takes cuda:LOCAL_RANK; "
                             "pass --device cuda (or set CUDA_VISIBLE_DEVICES)")
        count = torch.cuda.device_count()
        if count == 0:
            raise InputError("--device cuda: no GPU visible to this rank; use --device cpu")
        torch.cuda.set_device(self.local_rank % count)  # more ranks than GPUs: they share them
        return torch.device("cuda", self.local_rank % count)

    def shares_gpus(self) -> bool:
        """More ranks on this node than GPUs (NCCL refuses two ranks on one GPU: use gloo)."""
        return torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", self.world))


class Group:
    """The process group of a sharded run (nothing when world == 1): nccl on GPUs (gloo where ranks
    share a GPU), gloo on the CPU, plus a gloo group for the small Python objects the ranks agree
    on (no tensor is ever exchanged: the results meet in the files)."""

    def __init__(self, ranks: Ranks, device: torch.device) -> None:
        self.ranks, self._objects = ranks, None
        if ranks.world == 1:
            return
        if not dist.is_available():
            raise InputError("this torch has no torch.distributed: run one process")
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" and not ranks.shares_gpus() else "gloo"
            wait = join_timeout()
            try:  # the rendezvous gets a short timeout; the work's own group below the long one
                dist.init_process_group(backend, timeout=wait)
            except (RuntimeError, ValueError) as error:  # torch's DistStoreError is a RuntimeError
                where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
                raise InputError(
                    f"rank {ranks.rank} of {ranks.world} could not join the job at {where} within "
                    f"{wait.total_seconds():g} s ({type(error).__name__}); leftover RANK/WORLD_SIZE/"
                    f"MASTER_* variables? unset them to run one process (or set {JOIN_TIMEOUT_ENV})"
                ) from None
        self._objects = dist.new_group(backend="gloo", timeout=WAIT)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if self.ranks.world == 1:
            return [value]
        found: list[Any] = [None] * self.ranks.world
        dist.all_gather_object(found, value, group=self._objects)
        return found

    def close(self) -> None:
        if self.ranks.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
