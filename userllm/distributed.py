"""DistributedDataParallel plumbing: one process per device under ``torchrun`` (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UserError
from .loop import pick_device


@dataclass
class Dist:
    """This process's place in the job: rank, world size and device (a single process is rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, value: float) -> float:
        """Average of a scalar over ranks (for logging)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t) / self.world

    def all_finite(self, value: float) -> bool:
        """Whether ``value`` is finite on every rank (so that all ranks stop at the same step)."""
        ok = math.isfinite(value)
        if self.world == 1:
            return ok
        t = torch.tensor([1.0 if ok else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item() > 0)

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_distributed(device: str, batch_size: int) -> Dist:
    """The :class:`Dist` of this process: WORLD_SIZE > 1 (``torchrun``) starts the process group."""
    dev = pick_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if batch_size < world:
        raise UserError(f"--batch-size {batch_size} is smaller than the {world} DDP processes")
    return Dist(rank, world, dev)
