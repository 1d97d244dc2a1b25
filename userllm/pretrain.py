"""Stage 1 of User-LLM: pretrain a user encoder on event sequences (``python -m userllm.pretrain``).

    python -m userllm.pretrain --out runs/pretrain                       # synthetic data, AR encoder
    python -m userllm.pretrain --dataset movielens --data-path ../shared/data/movielens/ml-latest-small \\
        --out runs/ml-small

Training data: :class:`userllm.data.PretrainWindows` over each user's train part (the validation and
test events are never seen). The AR encoder (and the SASRec peer, ``--encoder sasrec``) learns next-event
prediction at every position of a window (stride ``window`` by default: every train transition predicted
once per epoch); the dual encoder learns the last event of each window from the events before it (stride 1
by default: one window per train target), or with ``--dual-targets all`` every event from its prefix
(stride ``window``). Optimizer AdamW, cosine schedule with linear warmup, gradient clipping; bf16 autocast on CUDA.

Evaluation (leave-last-out, full ranking over all items): each user's last event is the test target and
the ``window`` events before it the input; Recall@1/5/10 and NDCG@10 of the encoder's next-item scores
and of a popularity baseline (item counts over the train part) on the same examples.
``--filter-seen`` removes items already in the user's history from the candidates (except the target
itself; see :mod:`userllm.metrics`). ``--eval-every N`` also reports the validation split every N steps;
with ``--patience P`` the run stops after P validations without a better validation Recall@10 and the
encoder keeps the weights of the best one (evaluated on test and saved; ``metrics.json`` has
``best_val_step`` and ``steps_run``).

Run directory (``--out``): ``config.json``, ``metrics.jsonl`` (training log), ``metrics.json`` (final
table), ``checkpoints/step_XXXXXXXX.safetensors`` (resumable with ``--resume``; ``--steps`` may be raised
then, the schedule is the one of the final length), ``encoder.json`` (its kind and config) and
``encoder.safetensors`` (the trained encoder for the next stage, loadable with
:func:`userllm.encoders.load_encoder`). Options come from the command line and/or ``--config FILE``
(:class:`userllm.config.PretrainConfig`); the recipe is :mod:`userllm.encoders.pretraining`.

Reference figures (defaults: AR encoder, window 50, d_model 64, 2 layers, 40 epochs = 1440 steps of 64
windows, seed 0; CPU, 1 thread, about 19 minutes on the shared 2-core machine), on ml-latest-small with
``python -m userllm.pretrain --dataset movielens --data-path ../shared/data/movielens/ml-latest-small
--out runs/ml-small`` (610 users, 9724 items, test = each user's last rating):

    model        recall@1  recall@5  recall@10  ndcg@10
    encoder        0.0082    0.0246     0.0590   0.0270     (3.0x popularity's Recall@10)
    popularity     0.0016    0.0115     0.0197   0.0092
    with --filter-seen: encoder 0.0148 / 0.0426 / 0.0902 / 0.0427, popularity 0.0033 / 0.0230 / 0.0377 / 0.0178

The synthetic default (``python -m userllm.pretrain``, 320 steps) takes about 25 s and reaches
Recall@10 0.29 against popularity's 0.047.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .cli import run_cli
from .config import PretrainConfig, parse_config as _parse
from .encoders import save_encoder
from .encoders.pretraining import pretrain_encoder, train_item_counts
from .errors import UserError
from .evaluation import format_table, rank_next_items, subset_indices
from .factory import ENCODER_FILE, ENCODER_SPEC_FILE, load_data
from .loop import pick_device, seed_everything
from .runs import MetricsLogger, cleanup_on_failure, open_run, write_metrics, write_run_config
from .utils.atomic import write_json

__all__ = ["PretrainConfig", "parse_config", "pretrain", "main"]


def parse_config(argv: Sequence[str] | None) -> PretrainConfig:
    return _parse(argv, PretrainConfig, description=__doc__.split("\n\n")[0])


def eval_indices(n: int, cfg: PretrainConfig) -> np.ndarray:
    """The users scored (``--max-eval-users``): a fixed subset drawn from (seed, 1)."""
    return subset_indices(n, cfg.max_eval_users, [cfg.seed, 1])


class EarlyStopping:
    """Tracks the best validation score and a copy of the weights that reached it (``--patience``)."""

    def __init__(self, patience: int):
        self.patience, self.since = patience, 0
        self.step, self.score, self.state = 0, float("-inf"), None

    def update(self, step: int, score: float, model: torch.nn.Module) -> bool:
        """Record validation ``score`` at ``step``; True when ``patience`` validations in a row were no better."""
        if score > self.score:
            self.step, self.score, self.since = step, score, 0
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.since += 1
        return self.since >= self.patience


def pretrain(cfg: PretrainConfig) -> int:
    """Run the whole stage for a validated config (see the module docstring); returns 0."""
    out = Path(cfg.out)
    resume_from, resuming = open_run(cfg, out, checkpoint=cfg.checkpoint)
    with cleanup_on_failure(out, resuming=resuming):
        return _pretrain(cfg, out, resume_from, resuming)


def _pretrain(cfg: PretrainConfig, out: Path, resume_from: Path | None, resuming: bool) -> int:
    from .checkpoint import read_checkpoint
    from .data import PretrainWindows, next_item_eval

    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    t0 = time.time()
    ds = load_data(cfg)
    windows = PretrainWindows(ds, cfg.window, "train", stride=cfg.effective_stride)
    if len(windows) == 0:
        raise UserError(f"the {cfg.dataset} dataset has no training windows (users need >= 4 events)")
    all_windows = len(windows)
    if cfg.train_fraction < 1.0:
        keep = max(1, round(cfg.train_fraction * all_windows))
        windows = windows.subset(np.sort(np.random.default_rng(cfg.seed).choice(all_windows, keep, replace=False)))
    test_set = next_item_eval(ds, cfg.window, "test")
    val_set = next_item_eval(ds, cfg.window, "val") if cfg.eval_every else None
    popularity = train_item_counts(ds)
    stride = cfg.effective_stride
    paper = "the paper's setting" if stride == 1 else \
        f"--stride 1, the paper's setting, would give {PretrainWindows.count(ds, 1)}"
    print(f"data: {cfg.dataset}: {ds.num_users} users, {ds.num_events} events, {ds.num_items - 1} items; "
          f"{len(windows)} training windows of up to {cfg.window} events at stride {stride} ({paper})"
          f"{f', a {cfg.train_fraction:g} sample of {all_windows}' if len(windows) < all_windows else ''} "
          f"({time.time() - t0:.1f}s)", flush=True)
    total_steps = cfg.total_steps(len(windows))
    print(f"training {cfg.encoder} encoder for {total_steps} steps of {cfg.batch_size} windows", flush=True)

    resume_step = None
    if resume_from is not None:
        resume_step = int(read_checkpoint(resume_from)[1]["step"])
        print(f"resuming from {resume_from} at step {resume_step}", flush=True)
    elif resuming:
        print(f"--resume: no checkpoint in {out} yet; starting at step 0", flush=True)
    write_run_config(out, cfg.to_dict())
    write_json(out / ENCODER_SPEC_FILE, {"kind": cfg.encoder, "config": cfg.encoder_spec(ds)})
    val_idx = eval_indices(len(val_set), cfg) if val_set is not None else None
    best = EarlyStopping(cfg.patience)
    with MetricsLogger(out / "metrics.jsonl", resume_step=resume_step if resuming else None) as logger:
        def validate(step: int, encoder, bar) -> bool:
            # With --patience the last step is validated too: the weights kept are the best validated ones.
            if val_set is None or step % cfg.eval_every or (step == total_steps and not cfg.patience):
                return False
            val = rank_next_items(encoder, ds, val_set, val_idx, device, cfg.filter_seen)["encoder"]
            logger.log({"step": step, "split": "val", **val})
            bar.write(f"step {step}: val recall@10 {val['recall@10']:.4f} ndcg@10 {val['ndcg@10']:.4f}")
            stop = best.update(step, val["recall@10"], encoder) if cfg.patience else False
            if stop:
                bar.write(f"step {step}: early stop, no better validation recall@10 in {cfg.patience} validations; "
                          f"keeping step {best.step} ({best.score:.4f})")
            return stop

        encoder, stats = pretrain_encoder(ds, cfg, device, windows=windows, resume_from=resume_from,
                                          checkpoint_dir=out, logger=logger, on_step=validate)
        if best.state is not None:
            encoder.load_state_dict(best.state)
            stats["best_val_step"] = best.step
        results = final_evaluation(cfg, ds, encoder, stats, val_set, val_idx, test_set, popularity, device, logger)
    save_encoder(encoder.cpu(), out / ENCODER_FILE,
                 extra={"dataset": cfg.dataset, "data_path": cfg.data_path, "window": cfg.window,
                        "min_user_events": cfg.min_user_events, "steps": total_steps})
    write_metrics(out, results)
    print(f"wrote {out / ENCODER_FILE} and {out / 'metrics.json'}")
    return 0


def final_evaluation(cfg: PretrainConfig, ds, encoder, stats: dict, val_set, val_idx, test_set,
                     popularity: torch.Tensor, device: torch.device, logger: MetricsLogger) -> dict[str, Any]:
    """The final validation (with --eval-every) and test tables; returns the metrics.json content."""
    results: dict[str, Any] = {"steps": stats["steps"], "steps_run": stats["steps_run"],
                               "train_seconds": stats["train_seconds"],
                               "dataset": cfg.dataset, "encoder": cfg.encoder, "filter_seen": cfg.filter_seen,
                               "window": cfg.window, "num_users": ds.num_users, "num_items": ds.num_items - 1}
    if "best_val_step" in stats:
        results["best_val_step"] = stats["best_val_step"]
    if val_set is not None:
        results["val"] = rank_next_items(encoder, ds, val_set, val_idx, device, cfg.filter_seen, popularity)
        print(_table(results["val"], "validation (second-to-last event)"))
    test_idx = eval_indices(len(test_set), cfg)
    results["test"] = rank_next_items(encoder, ds, test_set, test_idx, device, cfg.filter_seen, popularity)
    enc_r10, pop_r10 = results["test"]["encoder"]["recall@10"], results["test"]["popularity"]["recall@10"]
    results["test_recall@10_ratio"] = enc_r10 / pop_r10 if pop_r10 > 0 else None
    print(_table(results["test"], f"test (leave-last-out, full ranking{', seen filtered' if cfg.filter_seen else ''})"))
    logger.log({"step": stats["steps_run"], "split": "test", **results["test"]["encoder"]})
    return results


def _table(results: dict[str, dict], title: str) -> str:
    return format_table([{"model": name, **m} for name, m in results.items()], title)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return pretrain(cfg)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
