"""Multi-process training under ``torchrun``: process group set-up and the few collectives used.

``torchrun --nproc_per_node=N [--nnodes ...] -m simmstnet train ...`` sets RANK, WORLD_SIZE and
LOCAL_RANK (plus MASTER_ADDR/PORT); :func:`setup` then joins the process group (NCCL on CUDA,
gloo on CPU) and pins each process to GPU ``LOCAL_RANK``. Without those variables everything
here is a no-op for a single process, so the trainer has one code path.

Division of labour: every rank trains on its own shard of the training windows (DDP averages
the gradients); rank 0 alone evaluates, decides early stopping and writes files, and
:func:`broadcast` hands its decisions to the others. Checkpoints are read by every rank on
resume, so multi-node runs need ``out`` on a shared file system.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from simmstnet.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` -> GPU ``local_rank``; UserError if absent."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cpu":
        return torch.device("cpu")
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"train.device={preference} but no CUDA device is available (use cpu or auto)")
        index = int(preference.split(":", 1)[1]) if ":" in preference else local_rank
        if index >= torch.cuda.device_count():
            raise UserError(f"train.device={preference}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    raise UserError(f"train.device must be auto, cpu, cuda or cuda:N, got {preference!r}")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device_preference: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; return this process's place and device."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistInfo(device=resolve_device(device_preference))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Rank 0 evaluates while the others wait in a broadcast: allow long evaluations.
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(hours=2))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(info: DistInfo, obj: Any) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(info: DistInfo, tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (a new tensor; the input is left alone)."""
    if not info.enabled:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_min(info: DistInfo, value: int) -> int:
    if not info.enabled:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64,
                     device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
