"""The training input pipeline through ``torch.utils.data``: windows gathered per batch, an epoch-wise
shuffling batch sampler with ``DistributedSampler`` semantics and exact mid-epoch resume, and a
``DataLoader`` factory (worker processes, prefetching, ``pin_memory`` on CUDA).

Order of the data (a pure function of ``(seed, step)``, so a resumed run continues exactly):

* the windows of epoch ``e`` are ``np.random.default_rng([seed, e]).permutation(n)`` (``arange(n)``
  without shuffling), drawn once when the epoch starts;
* global batch ``i`` of an epoch is ``order[i * B:(i + 1) * B]`` (``B`` = the global batch size);
  ``drop_last`` drops a partial last batch (unless it is the only one), otherwise an epoch has ``ceil(n / B)`` batches;
* global step ``s`` is batch ``s % batches_per_epoch`` of epoch ``s // batches_per_epoch``;
* rank ``r`` of ``world`` processes takes ``global_batch[r::world]``: the ranks' shards of one step are
  disjoint, cover the global batch, and do not depend on how many processes there are, so ``world``
  processes see exactly what one process sees with the same global batch.

Per-step cost: the sampler slices the epoch's permutation (O(B)) and the dataset gathers the B windows
with one fancy-indexing gather per feature (O(B x window)); neither touches the other windows. Building
the permutation costs O(n) once per epoch (0.3 s at 14M windows), i.e. O(1) per step amortised. Resuming
at step ``s`` skips the consumed batches of its epoch by arithmetic (the permutation is drawn and
sliced at the batch of ``s``), not by generating them.

    sampler = EpochBatchSampler(len(windows), batch_size=64, seed=0, start_step=step, steps=total)
    loader = make_loader(WindowDataset(windows), sampler, workers=2, device=device)
    for s, batch in zip(range(step, total), loader): ...
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..utils.memory import reuse_freed_memory
from .examples import Examples, PretrainWindows, collate

#: Batches each worker prepares ahead of the loop (torch's own default): with 2 workers, 4 batches are
#: in flight, which covered the gather time of every step measured in benchmarks/test_scale.py.
DEFAULT_PREFETCH = 2


class EpochBatchSampler(Sampler[np.ndarray]):
    """Index arrays (int64 [B / world]) of consecutive global steps, in the order of the module docstring.

    n: windows in the dataset; batch_size: the global batch (all ranks together); seed: the data-order seed;
    shuffle: a new permutation per epoch (False: the windows in order every epoch); drop_last: drop a
    partial last batch of each epoch; rank / world: this process's shard; start_step: the first global
    step to yield (resume); steps: yield up to (not including) this global step, None = forever.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 rank: int = 0, world: int = 1, start_step: int = 0, steps: int | None = None):
        if n < 1:
            raise ValueError(f"EpochBatchSampler: the dataset is empty (n = {n})")
        if batch_size < 1:
            raise ValueError(f"EpochBatchSampler: batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"EpochBatchSampler: rank {rank} is not in [0, {world})")
        if batch_size < world:
            raise ValueError(f"EpochBatchSampler: the global batch {batch_size} is smaller than the {world} ranks")
        if start_step < 0 or (steps is not None and steps < start_step):
            raise ValueError(f"EpochBatchSampler: bad step range [{start_step}, {steps})")
        self.n, self.batch_size, self.seed, self.shuffle, self.drop_last = n, batch_size, seed, shuffle, drop_last
        self.rank, self.world, self.start_step, self.steps = rank, world, start_step, steps

    @property
    def batches_per_epoch(self) -> int:
        # drop_last with fewer windows than one batch still makes one (partial) batch per epoch, as before.
        return max(1, self.n // self.batch_size) if self.drop_last else math.ceil(self.n / self.batch_size)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of a global step."""
        return divmod(step, self.batches_per_epoch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """int64 [n]: the window order of ``epoch``."""
        if not self.shuffle:
            return np.arange(self.n, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def global_batch(self, step: int) -> np.ndarray:
        """int64 [<= B]: every rank's windows of ``step`` (draws that epoch's permutation; for tests and tools)."""
        epoch, i = self.position(step)
        return self.epoch_order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

    def __iter__(self) -> Iterator[np.ndarray]:
        step = self.start_step
        order, order_epoch = None, -1
        while self.steps is None or step < self.steps:
            epoch, i = self.position(step)
            if epoch != order_epoch:
                order, order_epoch = self.epoch_order(epoch), epoch
            yield order[i * self.batch_size:(i + 1) * self.batch_size][self.rank::self.world]
            step += 1

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an EpochBatchSampler without steps= is endless")
        return self.steps - self.start_step


class WindowDataset(Dataset):
    """Map-style dataset whose item is a whole batch: ``dataset[idx]`` (int64 [B] window indices) is the
    collated :class:`~userllm.data.examples.EventBatch` of those windows (or ``transform(batch)``).

    windows: :class:`PretrainWindows` (stage 1) or task :class:`Examples` (stage 2, with ``ds``).
    transform: applied to each EventBatch in the loader's worker (e.g. tokenising it into an LLM batch,
    so that work overlaps the training step too); must be deterministic for exact resume.
    """

    def __init__(self, windows: PretrainWindows | Examples, ds=None,
                 transform: Callable[[Any], Any] | None = None):
        if isinstance(windows, Examples) and ds is None:
            raise ValueError("WindowDataset: task Examples need their ProcessedDataset (ds=)")
        self.windows, self.ds, self.transform = windows, ds, transform

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, idx) -> Any:
        idx = np.asarray(idx, dtype=np.int64)
        if isinstance(self.windows, PretrainWindows):
            batch = self.windows.batch(idx)
        else:
            batch = collate(self.ds, self.windows, idx)
        return batch if self.transform is None else self.transform(batch)


def _as_is(batch: Any) -> Any:
    """collate_fn of a loader whose dataset already returns whole batches (a module function: picklable)."""
    return batch


def make_loader(dataset: Dataset, sampler: Sampler, *, workers: int = 0, prefetch: int = DEFAULT_PREFETCH,
                device: torch.device | str | None = None) -> DataLoader:
    """A DataLoader yielding ``dataset[idx]`` for each index array of ``sampler``, in the sampler's order.

    workers > 0: that many worker processes gather batches ahead of the loop (``prefetch`` each; they
    persist for the loader's life, so one loader serves a whole run); workers = 0 gathers in the loop.
    pin_memory on CUDA devices, so ``batch.to(device, non_blocking=True)`` overlaps the copy.
    """
    if workers < 0:
        raise ValueError(f"make_loader: workers must be >= 0, got {workers}")
    if prefetch < 1:
        raise ValueError(f"make_loader: prefetch must be >= 1, got {prefetch}")
    reuse_freed_memory()                  # a step's large temporaries come back every step (see there)
    pin = torch.device(device).type == "cuda" if device is not None else False
    extra = dict(prefetch_factor=prefetch, persistent_workers=True) if workers else {}
    # Its own generator: each iterator draws a worker base seed, and from the global RNG that draw would
    # shift the dropout stream of a resumed run (the RNG is restored from the checkpoint just before).
    return DataLoader(dataset, sampler=sampler, batch_size=None, collate_fn=_as_is, num_workers=workers,
                      pin_memory=pin, generator=torch.Generator().manual_seed(0), **extra)
