"""The training loop both stages share (encoder pretraining and User-LLM training), and its parts:
seeding, the learning-rate schedule, device and precision, progress bars and the optimizer step.

:func:`train_loop` owns the step counter and what every step must respect whatever is trained: the
``log_every`` / ``checkpoint_every`` cadence, the progress bar, the training time (added up across
resumptions) and the stop on a non-finite loss (:class:`TrainingDiverged`: no checkpoint of it is
written, the last good one is named). The stage supplies one step (``step_fn``), its log record and its
checkpoint.

Both stages take their batches from :mod:`userllm.data.loader` (an epoch sampler seeded by (seed, epoch) that
starts at the resumed step), so a resumed run continues exactly where the interrupted one was; the two
LLMs of ``python -m userllm.explore`` take theirs from the same epoch sampler (over in-memory example sets).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch

from .errors import UserError


# ---- seeding -------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ---- learning-rate schedule ------------------------------------------------------------------------
def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                       min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the base LR over ``warmup_steps``, then cosine decay to
    ``min_ratio * base`` at ``total_steps`` (held there afterwards). Call ``scheduler.step()`` per step.

    On resume the schedule is the one of the *final* ``total_steps``: the scheduler keeps only its step
    count in a checkpoint, so a run resumed with a larger ``--steps`` continues on the longer schedule
    (see :func:`resync_lr`)."""
    if warmup_steps < 0 or total_steps < 1 or not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"bad schedule: warmup={warmup_steps}, total={total_steps}, min_ratio={min_ratio}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resync_lr(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """After loading a scheduler's state: set the optimizer's learning rates from this scheduler's own
    schedule at its step (the same values when the schedule is unchanged; the new schedule's when the
    total steps changed on resume)."""
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


# ---- device and precision ----------------------------------------------------------------------------
def pick_device(device: str | None = "auto") -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA devices that support it; None (full fp32) elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The mixed-precision context for ``device`` (a no-op on CPU)."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def amp_factory(device: torch.device, enabled: bool = True) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory of the autocast context (``--bf16``; a no-op when disabled or on CPU)."""
    return (lambda: autocast(device)) if enabled else contextlib.nullcontext


# ---- progress -----------------------------------------------------------------------------------------
def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             initial: int = 0, disable: bool | None = None):
    """A tqdm bar on stderr; ``disable=None`` hides it when stderr is not a terminal (logs, tests)."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable, dynamic_ncols=True,
                leave=False)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Temporarily put ``module`` in eval mode (restoring its previous mode)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


# ---- one optimizer step ---------------------------------------------------------------------------------
def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler, params,
                   grad_clip: float = 0.0) -> None:
    """Backward ``loss``, clip the gradient norm of ``params`` to ``grad_clip`` (0 = no clipping), step the
    optimizer and the LR scheduler. Gradients are cleared first, so no stale gradient leaks in."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()


# ---- non-finite losses and weights -----------------------------------------------------------------------
class TrainingDiverged(UserError):
    """The loss (or the weights) became NaN or infinite: the run stops, and no checkpoint of it is written."""

    exit_code = 3


def last_good(checkpoint: Path | None) -> str:
    if checkpoint is None:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint is {checkpoint}"


def weights_diverged(step: int, last_checkpoint: Path | None, where: str | None = None) -> TrainingDiverged:
    """The error for non-finite weights at ``step`` (``where``: the tensor's name, when one process knows it)."""
    at = f" ({where})" if where else ""
    return TrainingDiverged(f"step {step}: the weights became non-finite{at}; no checkpoint of them was written "
                            f"and {last_good(last_checkpoint)} (lower --lr?)")


def check_finite_weights(modules: Mapping[str, torch.nn.Module], step: int, last_checkpoint: Path | None) -> None:
    """Raise :class:`TrainingDiverged` when a parameter or buffer of ``modules`` is not finite (before a
    checkpoint of them is written)."""
    for name, module in modules.items():
        for key, t in module.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise weights_diverged(step, last_checkpoint, f"{name}.{key}")


# ---- the loop ----------------------------------------------------------------------------------------------
@dataclass
class LoopResult:
    """What :func:`train_loop` reports.

    step: the step reached (the total, or where ``on_step`` stopped the run early); start_step: where this
    process started (after a resume);
    first_loss / last_loss: of this process's first and last step (None when no step ran);
    seconds: training time in seconds over the whole run, resumptions included;
    checkpoint: the last checkpoint written (or resumed from).
    """

    step: int
    start_step: int
    first_loss: float | None
    last_loss: float | None
    seconds: float
    checkpoint: Path | None


def train_loop(step_fn: Callable[[int], tuple[Any, dict]], *, start_step: int, total_steps: int, log_every: int,
               checkpoint_every: int, on_log: Callable[[int, list[float], dict, float], float] | None = None,
               save: Callable[[int, dict, float], Path | None] | None = None,
               on_step: Callable[[int, Any], None] | None = None, prior_seconds: float = 0.0,
               last_checkpoint: Path | None = None, all_finite: Callable[[float], bool] = math.isfinite,
               desc: str = "train", disable_progress: bool | None = None) -> LoopResult:
    """Run steps ``start_step .. total_steps - 1``.

    step_fn(step) -> (loss, info): one optimizer step on the batch of ``step`` (the loss a tensor or float;
        info: what the stage's log record or checkpoint wants of that step, e.g. the epoch).
    on_log(step, losses, info, seconds) -> shown loss: called every ``log_every`` steps and at the end
        with the losses since the last call (and the last step's info; seconds = training time so far).
    save(step, info, seconds) -> checkpoint path: every ``checkpoint_every`` steps and at the end.
    on_step(step, bar): after every step (e.g. a validation); a true return value stops the run after that
        step (early stopping), with a checkpoint of it when ``save`` is given.
    all_finite(loss): whether the step's loss is finite (under DDP: on every rank, so all stop together).
    A non-finite loss raises :class:`TrainingDiverged` naming the step and ``last_checkpoint`` (the
    newest checkpoint written), before anything of that step is logged or saved.
    """
    bar = progress(total=total_steps, initial=start_step, desc=desc, disable=disable_progress)
    window: list[float] = []
    first = last = None
    step = start_step
    t0 = time.time()
    try:
        while step < total_steps:
            loss, info = step_fn(step)
            value = loss.item() if isinstance(loss, torch.Tensor) else float(loss)
            step += 1
            if not all_finite(value):
                raise TrainingDiverged(f"step {step}: the training loss is {value}; stopped without saving a "
                                       f"checkpoint of it, and {last_good(last_checkpoint)} (lower --lr?)")
            first = value if first is None else first
            last = value
            window.append(value)
            bar.update(1)
            if step % log_every == 0 or step == total_steps:
                shown = on_log(step, window, info, prior_seconds + time.time() - t0) if on_log else window[-1]
                window = []
                bar.set_postfix(loss=f"{shown:.3f}")
            stop = bool(on_step(step, bar)) if on_step is not None else False
            if save is not None and (step % checkpoint_every == 0 or step == total_steps or stop):
                last_checkpoint = save(step, info, prior_seconds + time.time() - t0) or last_checkpoint
            if stop:
                break
    finally:
        bar.close()
    return LoopResult(step, start_step, first, last, prior_seconds + time.time() - t0, last_checkpoint)
