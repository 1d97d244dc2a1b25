"""The encoder pretraining recipe (stage 1 of User-LLM), shared by ``python -m userllm.pretrain`` and the
brief pretraining of ``python -m userllm.train --pretrain-steps``.

Training data: :class:`userllm.data.PretrainWindows` over each user's train part (the validation and
test events are never seen). The AR and SASRec encoders learn next-event prediction at every position of a
window; the dual encoder learns the last event of each window from the events before it (or, with
``targets="all"``, every event from its prefix). Optimizer AdamW (weight
decay on the weight matrices only), linear warmup + cosine decay, gradient clipping; bf16 autocast on
CUDA; the loop is :func:`userllm.loop.train_loop` (the one User-LLM training uses too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..errors import UserError
from ..loop import autocast, check_finite_weights, cosine_with_warmup, optimizer_step, train_loop
from ..metrics import popularity_scores
from . import build_encoder


def train_item_counts(ds) -> torch.Tensor:
    """Popularity: item counts over every user's train part (all events but the last two)."""
    n = np.diff(ds.offsets)
    keep = np.ones(ds.num_events, dtype=bool)
    keep[ds.offsets[1:] - 1] = False
    keep[(ds.offsets[1:] - 2)[n >= 2]] = False
    return popularity_scores(ds.features["item"][keep], ds.num_items)


def make_optimizer(cfg, encoder: torch.nn.Module, total_steps: int):
    """AdamW (weight decay on the weight matrices only: not on tables, biases, norms) + warmup/cosine."""
    decay = [p for n, p in encoder.named_parameters() if p.dim() >= 2 and "tables" not in n]
    no_decay = [p for n, p in encoder.named_parameters() if not (p.dim() >= 2 and "tables" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.effective_lr, betas=(0.9, 0.98))
    return optimizer, cosine_with_warmup(optimizer, cfg.warmup, total_steps, cfg.min_lr_ratio)


def pretrain_encoder(ds, cfg, device: torch.device, *, windows=None, resume_from: Path | None = None,
                     checkpoint_dir: Path | None = None, logger=None,
                     on_step: Callable[[int, torch.nn.Module, Any], bool | None] | None = None,
                     desc: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Pretrain a fresh encoder on ``ds`` with the stage's recipe: returns ``(encoder, stats)``.

    cfg: a :class:`~userllm.config.PretrainConfig`. The encoder is ``build_encoder(cfg.encoder,
    cfg.encoder_spec(ds))`` on ``device``, trained on the train-part windows (``windows``, default
    ``PretrainWindows(ds, cfg.window, "train")``) for ``cfg.total_steps(len(windows))`` steps; the batch
    of a step is a pure function of (seed, step).

    resume_from: a checkpoint of this run to continue from (model, optimizer, scheduler, RNG, step, time).
    checkpoint_dir: save resumable checkpoints there every ``cfg.checkpoint_every`` steps and at the end.
    logger: receives a record every ``cfg.log_every`` steps. on_step(step, encoder, progress_bar): called
    after every step (e.g. a validation every N steps); a true return value stops the training there.
    stats: ``steps`` (total), ``steps_run`` (the step reached: < steps when on_step stopped it), ``start_step``,
    ``first_loss`` / ``final_loss`` (of this process's first and last step; None when no step ran),
    ``train_seconds`` (over every resumption).
    A non-finite loss stops with :class:`userllm.loop.TrainingDiverged`.
    """
    from ..data import PretrainWindows

    if windows is None:
        windows = PretrainWindows(ds, cfg.window, "train", stride=cfg.effective_stride)
    if len(windows) == 0:
        raise UserError(f"the {cfg.dataset} dataset has no training windows (users need >= 4 events)")
    total_steps = cfg.total_steps(len(windows))
    encoder = build_encoder(cfg.encoder, cfg.encoder_spec(ds)).to(device)
    if hasattr(encoder, "set_label_frequencies"):  # dual: the logQ correction's item frequencies
        encoder.set_label_frequencies(train_item_counts(ds).to(device))
    optimizer, scheduler = make_optimizer(cfg, encoder, total_steps)
    step, prior_seconds = 0, 0.0
    if resume_from is not None:
        state = load_checkpoint(resume_from, encoder, optimizer, scheduler)
        step, prior_seconds = state.step, float(state.extra.get("train_seconds", 0.0))
        from ..loop import resync_lr

        resync_lr(scheduler)
    if step > total_steps:
        raise UserError(f"--steps {total_steps}: the run is already at step {step}")
    encoder.train()
    from ..data.loader import EpochBatchSampler, WindowDataset, make_loader

    # One sampler/loader for the run: the order of userllm.data.loader (the epoch's permutation drawn once,
    # a resume starts at the batch of `step` without replaying the ones before it).
    sampler = EpochBatchSampler(len(windows), cfg.batch_size, seed=cfg.seed, drop_last=False, start_step=step,
                                steps=total_steps)
    batches = iter(make_loader(WindowDataset(windows), sampler, workers=cfg.workers, device=device))

    def step_fn(step: int):
        epoch, index = sampler.position(step)
        batch = next(batches)
        with autocast(device):
            loss, per_feature = encoder.next_event_loss([x.to(device) for x in batch.features],
                                                        batch.lengths.to(device))
        optimizer_step(loss, optimizer, scheduler, encoder.parameters(), cfg.grad_clip)
        return loss, {"epoch": epoch, "index": index, "per_feature": per_feature}

    def on_log(step: int, losses: list[float], info: dict, seconds: float) -> float:
        if logger is not None:
            logger.log({"step": step, "epoch": info["epoch"], "loss": losses[-1], "lr": scheduler.get_last_lr()[0],
                        **{f"loss/{k}": v.item() for k, v in info["per_feature"].items()}})
        return losses[-1]

    def save(step: int, info: dict, seconds: float) -> Path:
        check_finite_weights({"encoder": encoder}, step, last_saved[0])
        last_saved[0] = save_checkpoint(checkpoint_dir, step, encoder, optimizer, scheduler,
                                        extra={"epoch": info["epoch"], "batch_in_epoch": info["index"] + 1,
                                               "train_seconds": round(seconds, 3)},
                                        keep_last=cfg.keep_checkpoints)
        return last_saved[0]

    last_saved: list[Path | None] = [resume_from]
    result = train_loop(step_fn, start_step=step, total_steps=total_steps, log_every=cfg.log_every,
                        checkpoint_every=cfg.checkpoint_every, on_log=on_log,
                        save=save if checkpoint_dir is not None else None,
                        on_step=(lambda s, bar: on_step(s, encoder, bar)) if on_step is not None else None,
                        prior_seconds=prior_seconds, last_checkpoint=resume_from,
                        desc=desc or f"pretrain {cfg.encoder}")
    stats = {"steps": total_steps, "steps_run": result.step, "start_step": result.start_step,
             "first_loss": result.first_loss,
             "final_loss": result.last_loss, "train_seconds": round(result.seconds, 2)}
    return encoder, stats
