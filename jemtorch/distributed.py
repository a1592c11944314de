"""Multi-process training with torch.distributed, as launched by ``torchrun`` (one process per GPU, or per CPU worker).

    torchrun --nproc-per-node 4 -m jemtorch train ARGS                       # one machine
    torchrun --nnodes 2 --node-rank 0 --rdzv-endpoint host:29500 --nproc-per-node 4 -m jemtorch train ARGS

``jem train`` without torchrun runs in one process exactly as before (``Dist.single()``). Under torchrun (the
``WORLD_SIZE`` environment variable above 1) the process group is started with NCCL on GPUs and gloo on CPUs. What each
rank does, and why, is in ``train.py`` and the README ("Multi-process training").
"""
from __future__ import annotations

import datetime
import gc
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """Where this process stands: ``rank`` of ``world_size`` processes; rank 0 writes every file."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls) -> Dist:
        return cls()

    @classmethod
    def from_env(cls, device: str = "auto") -> Dist:
        """Join the process group torchrun set up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...);
        a single process when ``WORLD_SIZE`` is unset or 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls.single()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        global _JOINED
        _JOINED = True
        if not dist.is_initialized():
            cuda = torch.cuda.is_available() and device != "cpu"
            if cuda:
                torch.cuda.set_device(local)
            # a rank that waits longer than this for the others is told so instead of hanging forever
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        return cls(rank, world, local)

    def device(self, name: str) -> str:
        """The device of this rank: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` under torchrun with GPUs."""
        if self.enabled and name in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return name

    # collectives (no-ops in one process) -------------------------------------------------------------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(t).div_(self.world_size) if self.enabled else t

    def all_gather_object(self, obj: Any) -> list:
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self, ok: bool = True) -> None:
        """Leave the process group. After a clean run every rank meets at a barrier, drops what still refers to the
        group (the DDP wrapper, pending work) and destroys it. After an error it is left alone: destroying a group
        while another rank still waits in a collective can hang (torchtitan PR #1342); the process exits instead
        (``exit_process``) and the other ranks see the broken connection."""
        if not (self.enabled and dist.is_initialized()) or not ok:
            return
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


_JOINED = False  # set once this process has joined a torchrun process group


def exit_process(code: int) -> None:
    """End a torchrun worker with ``code`` without the interpreter's teardown, once its files are closed.

    Interpreter finalisation can run while gloo's worker threads still hold tensors; the process then aborts with
    "terminate called without an active exception" (SIGABRT) even though training finished (seen once in CI on the
    2-rank test; pytorch/pytorch#179291, #190489). A worker that has nothing left to do exits at once instead. A
    process that never joined a group (every plain ``jem`` call) returns and exits normally."""
    if not _JOINED:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
