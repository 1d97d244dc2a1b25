"""Multi-process plumbing: one process per device under ``torchrun`` (gloo on CPU, nccl on CUDA).

``--distributed ddp`` wraps the model in DistributedDataParallel; ``--distributed fsdp`` shards it with
FSDP2 (:mod:`userllm.fsdp`). Either way every rank trains on its shard of the same global batch
(:mod:`userllm.data.loader`) and :meth:`Dist.token_share` weights its loss so that the averaged
gradient is the one of a single process on the whole global batch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UserError
from .loop import pick_device

#: ``--distributed``: how several processes share the training (DDP: replicated model; FSDP2: sharded).
PARALLELISMS = ("ddp", "fsdp")


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

    def all_true(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (collective)."""
        if self.world == 1:
            return ok
        t = torch.tensor([1.0 if ok else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item() > 0)

    def all_finite(self, value: float) -> bool:
        """Whether ``value`` is finite on every rank (so that all ranks stop at the same step)."""
        return self.all_true(math.isfinite(value))

    def token_share(self, labels: torch.Tensor) -> float:
        """``world * n_local / n_global``: the factor that turns this rank's token-mean loss into its share of
        the global batch's token-mean loss (collective).

        labels: int64 [B_local, T] (-100 outside the targets; the LM shifts them by one, so the
        targets counted are ``labels[:, 1:]``; ``userllm.llm_data.IGNORE`` marks the others). DDP and FSDP average the ranks' gradients, so with this
        weight the update is that of one process on the whole global batch even when the ranks' rows hold
        different numbers of target tokens (titles of different lengths); the mean of the weighted losses
        over the ranks is the global batch's loss. 1.0 for a single process.
        """
        if self.world == 1:
            return 1.0
        from .llm_data import IGNORE

        n = (labels[:, 1:] != IGNORE).sum().to(device=self.device, dtype=torch.float64).reshape(1)
        local = float(n)
        torch.distributed.all_reduce(n)
        return self.world * local / max(float(n), 1.0)

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_distributed(device: str, batch_size: int, parallelism: str = "ddp") -> Dist:
    """The :class:`Dist` of this process: WORLD_SIZE > 1 (``torchrun``) starts the process group."""
    dev = pick_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if parallelism == "fsdp":
            raise UserError("--distributed fsdp: shards over several processes; launch with "
                            "torchrun --nproc-per-node N -m userllm.train ... (N >= 2)")
        return Dist(0, 1, dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if batch_size < world:
        raise UserError(f"--batch-size {batch_size} is smaller than the {world} {parallelism.upper()} processes")
    return Dist(rank, world, dev)
