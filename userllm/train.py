"""Stage 2 of User-LLM: train the LLM side on a task, evaluate, print a table (``python -m userllm.train``).

    python -m userllm.train                                    # synthetic data, ~4 minutes on 2 idle cores
    python -m userllm.train --strategy full --integration softprompt --perceiver-latents 8
    python -m userllm.train --baseline textprompt --strategy lora          # the TextPrompt baseline
    python -m userllm.train --window 50 --text-events 10                   # AR50TP10 mixed context
    python -m userllm.train --config run.yaml --resume --out runs/x        # continue a killed run
    torchrun --nproc-per-node 2 -m userllm.train ...                       # DDP (gloo on CPU, nccl on GPU)
    torchrun --nproc-per-node 2 -m userllm.train --distributed fsdp ...    # FSDP2: the model sharded

Pipeline (each piece built by :mod:`userllm.factory`): load (and cache) the dataset -> LLM (``--llm DIR``
or the embedded tiny Llama whose BPE tokenizer is trained on the dataset's text) -> user encoder
(``--encoder-checkpoint``, else a brief pretraining with the pretraining stage's recipe, else random) ->
:class:`~userllm.integration.UserLLM` (or the :class:`~userllm.integration.TextPromptModel` baseline) with
the chosen integration and training strategy -> AdamW with linear warmup + cosine decay, in the loop both
stages share (:func:`userllm.loop.train_loop`) -> evaluation with the trie-constrained beam search
(:mod:`userllm.evaluation`).

Run directory (:mod:`userllm.runs`): ``config.json`` (resolved options), ``metrics.jsonl`` (training
log), ``metrics.json`` (final results), ``checkpoints/step_XXXXXXXX.safetensors`` (resumable), ``llm/``
(LLM config + tokenizer), ``encoder.json`` (encoder kind + config), ``pretrain/`` (the brief pretraining,
when run) and ``profile.json`` with ``--profile``. A run that fails before its first checkpoint leaves
no directory behind.

Resume (``--resume --out RUN_DIR``): the data order is a pure function of (seed, step) and the checkpoint
holds model, optimizer, scheduler and RNG states, so a resumed run continues with exactly the losses the
uninterrupted run would have had (on CPU). ``--steps`` may be raised on resume: the learning-rate
schedule is always the one of the final ``--steps``. ``train_seconds`` and the logged ``elapsed`` add up
over the resumptions. ``--checkpoint PATH`` resumes from another checkpoint than the newest (e.g. the
last good one when the newest is damaged; the error names it).

Several processes (``torchrun``): each takes its shard of every global batch (:mod:`userllm.data.loader`)
and its loss is weighted by its share of the batch's target tokens (:meth:`userllm.distributed.Dist.token_share`),
so the losses and updates are those of one process on the same global batch (within fp32 rounding).
``--distributed fsdp`` shards the model with FSDP2 (:mod:`userllm.fsdp`: per decoder layer and
cross-attention block); its resumable checkpoints are ``checkpoints/step_XXXXXXXX.dcp/`` directories,
resumed with the same ``--resume`` by as many processes, and the end of the run also writes the trained
model unsharded (``step_XXXXXXXX.safetensors``, no optimizer state) for ``userllm.evaluate`` /
``userllm.generate``; the final evaluation runs on that unsharded model on rank 0.

A non-finite training loss stops the run (exit status 3) naming the step and the last good checkpoint;
no checkpoint of the diverged weights is written.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .cli import run_cli, select_kernels, user_errors
from .config import TrainConfig, parse_config
from .distributed import Dist, init_distributed
from .errors import UserError
from .evaluation import eval_subset, evaluate_and_report
from .factory import (ENCODER_SPEC_FILE, LLM_SPEC_DIR, build_encoder, build_llm, build_model, check_paths,
                      checkpoint_modules, count_parameters, fill_readout, load_data, make_batcher, set_threads)
from .loop import (amp_factory, check_finite_weights, cosine_with_warmup, optimizer_step, resync_lr,
                   seed_everything, train_loop, weights_diverged)
from .runs import (METRICS_LOG, MetricsLogger, cleanup_on_failure, open_run, read_jsonl, write_metrics,
                   write_run_config)
from .utils.atomic import write_json


def run_dir_for(cfg: TrainConfig, dist: Dist) -> Path:
    """``--out``, or ``runs/<dataset>-<task>-<model>-<time>`` (the same on every rank)."""
    if cfg.out is not None:
        return Path(cfg.out)
    if cfg.resume:
        raise UserError("--resume needs --out RUN_DIR (the run to continue)")
    stamp = dist.broadcast(time.strftime("%Y%m%d-%H%M%S"))
    return Path("runs") / f"{cfg.dataset}-{cfg.task}-{cfg.model_name}-{stamp}"


def train(cfg: TrainConfig) -> dict:
    """Run the whole stage; returns the final metrics (rank 0; {} on other ranks)."""
    check_paths(cfg)
    dist = init_distributed(cfg.device, cfg.batch_size, cfg.distributed)
    set_threads(cfg, dist.device)
    run_dir = run_dir_for(cfg, dist)
    resume_from, resuming = open_run(cfg, run_dir, checkpoint=cfg.checkpoint, sharded=cfg.distributed == "fsdp")
    with cleanup_on_failure(run_dir, resuming=resuming, enabled=dist.main):
        results = _train(cfg, dist, run_dir, resume_from, resuming)
    dist.close()
    return results


def _train(cfg: TrainConfig, dist: Dist, run_dir: Path, resume_from: Path | None, resuming: bool) -> dict:
    from .data.examples import make_examples

    log = print if dist.main else (lambda *a, **k: None)
    device = dist.device
    seed_everything(cfg.seed)
    log(select_kernels(cfg, device), flush=True)
    amp = amp_factory(device, cfg.bf16)
    t_start = time.time()

    # Data and the LLM: rank 0 builds the caches first, the others then read them.
    if dist.main:
        ds = load_data(cfg)
        llm, tok = build_llm(cfg, ds, log)
    dist.barrier()
    if not dist.main:
        ds = load_data(cfg)
        llm, tok = build_llm(cfg, ds, log)
    train_ex = make_examples(ds, cfg.task, cfg.window, "train", cfg.stride)
    if cfg.max_train_examples:
        train_ex = eval_subset(train_ex, cfg.max_train_examples, seed=cfg.seed)
    test_ex = eval_subset(make_examples(ds, cfg.task, cfg.window, "test"), cfg.eval_users)
    if len(train_ex) == 0:
        raise UserError(f"the {cfg.dataset} dataset has no {cfg.task} training examples")
    log(f"data: {cfg.dataset}: {ds.num_users} users, {ds.num_items - 1} items, {ds.num_events} events; "
        f"{cfg.task}: {len(train_ex)} train examples, {len(test_ex)} test users "
        f"({time.time() - t_start:.1f}s)", flush=True)
    if dist.main:
        from .llm import describe_llm, save_llm_spec

        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, cfg.to_dict() | {"out": str(run_dir), "resume": False, "checkpoint": None})
        save_llm_spec(run_dir / LLM_SPEC_DIR, llm, tok)
        log(f"llm: {cfg.llm or 'embedded default'}: {describe_llm(llm)}, tokenizer {len(tok)} tokens", flush=True)

    encoder = None
    if not cfg.text_prompt:
        encoder = build_encoder(cfg, ds, run_dir, device=device, is_main=dist.main, barrier=dist.barrier, log=log)
        if dist.main:
            write_json(run_dir / ENCODER_SPEC_FILE, {"kind": encoder.kind, "config": encoder.config.to_dict()})
    with user_errors("the model"):
        model = build_model(cfg, llm, encoder)
        fill_readout(model, ds, tok)
        model = model.to(device)
    if cfg.compile:  # userllm.kernels.compile: the blocks that call the fused ops, fullgraph
        from .kernels.compile import compile_model
        log(f"compile: {', '.join(compile_model(model)) or 'no block calls a fused op'}", flush=True)
    teacher = caption = None
    if cfg.distill_steps or cfg.caption_steps:  # the frozen encoder, copied before any step and a resume's load
        from .distill import CaptionStage, EncoderTeacher

        if cfg.distill_topk > ds.num_items - 1:
            raise UserError(f"--distill-topk: {cfg.distill_topk} is more than the {ds.num_items - 1} items")
        with user_errors("--distill-steps"):
            teacher = EncoderTeacher(model.encoder, cfg.distill_topk, cfg.distill_temperature, cfg.seed)
        if cfg.caption_steps:
            replaced = cfg.caption_replace or cfg.readout_tokens
            first, last = cfg.caption_temperatures
            caption = CaptionStage(teacher, cfg.readout_tokens, replaced, first, model.readout.num_items,
                                   temperature_end=last, steps=cfg.caption_steps)
            temps = f"{first:g}" if first == last else f"{first:g} -> {last:g}"
            log(f"caption: steps 0-{cfg.caption_steps - 1} write one of the readout's {cfg.readout_tokens} candidates, "
                f"the best {replaced} replaced by random items (temperature {temps})", flush=True)
        if cfg.distill_steps:
            log(f"distill: steps {cfg.caption_steps}-{cfg.caption_steps + cfg.distill_steps - 1} train on the "
                f"frozen encoder's draws (top {cfg.distill_topk}, temperature {cfg.distill_temperature:g})",
                flush=True)
    trainable, total = count_parameters(model)
    log(f"model: {cfg.model_name}: {trainable / 1e6:.3f}M of {total / 1e6:.3f}M parameters trainable", flush=True)
    batcher = make_batcher(cfg, ds, tok, model)
    fsdp = dist.world > 1 and cfg.distributed == "fsdp"
    shadow = None
    if fsdp:
        from .fsdp import meta_copy, shard_model

        shadow = meta_copy(model) if dist.main else None     # the unsharded structure, for the evaluation
        shard_model(model)

    params = [p for p in model.parameters() if p.requires_grad]     # after sharding: FSDP's DTensor params
    # The fused AdamW kernel (CPU and CUDA) is ~2x cheaper than the per-tensor loop for many small tensors.
    fused = device.type in ("cpu", "cuda") and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=fused)
    scheduler = cosine_with_warmup(optimizer, cfg.warmup, cfg.steps, cfg.min_lr_ratio if cfg.cosine else 1.0)
    step, before = 0, {}
    if resume_from is not None:
        if fsdp:
            from .fsdp import load_sharded

            state = load_sharded(resume_from, model, optimizer, scheduler)
        else:
            state = load_checkpoint(resume_from, checkpoint_modules(model, cfg), optimizer, scheduler)
        step, before = state.step, state.extra
        resync_lr(scheduler)                     # the schedule of the final --steps
        log(f"resumed from {resume_from} at step {step}", flush=True)
    elif resuming:
        log(f"--resume: no checkpoint in {run_dir} yet; starting at step 0", flush=True)
    if step > cfg.steps:
        raise UserError(f"--steps {cfg.steps}: the run is already at step {step}")
    prior_total = float(before.get("total_seconds", 0.0))
    ddp_model = model
    if dist.world > 1 and not fsdp:
        # Every trainable parameter is in the graph of every step (apply_strategy freezes the encoder's
        # pretraining-only heads), so DDP needs no find_unused_parameters traversal.
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    logger = MetricsLogger(run_dir / METRICS_LOG, resume_step=step if resuming else None) if dist.main else None
    model.train()
    profiler = None
    if cfg.profile and dist.main:
        from .profiling.train_profile import TrainProfiler

        profiler = TrainProfiler(cfg, device)

    def train_step(lb) -> torch.Tensor:
        with amp():
            loss = ddp_model(**lb.model_inputs(), labels=lb.labels).loss
        if dist.world > 1:          # this rank's share of the global batch's token mean (see the docstring)
            loss = loss * dist.token_share(lb.labels)
        optimizer_step(loss, optimizer, scheduler, params, cfg.grad_clip)
        return loss

    from .data.loader import EpochBatchSampler, WindowDataset, make_loader

    # This rank's shard of each global batch, in the order of userllm.data.loader (resume included).
    sampler = EpochBatchSampler(len(train_ex), cfg.batch_size, seed=cfg.seed, drop_last=True, rank=dist.rank,
                                world=dist.world, start_step=step, steps=cfg.steps)
    batches = iter(make_loader(WindowDataset(train_ex, ds), sampler, workers=cfg.workers, device=device))

    def step_fn(step: int):
        t0 = time.perf_counter()
        events = next(batches)
        swap = contextlib.nullcontext()
        if caption is not None and step < cfg.caption_steps:
            events, items = caption.relabel(events, step)
            swap = model.readout.candidates_replaced(items.to(device))
        elif teacher is not None and step < cfg.caption_steps + cfg.distill_steps:
            events = teacher.relabel(events, step)
        lb = batcher.train_batch(events).to(device)
        with swap:
            if profiler is not None and profiler.train_step is None:
                box: list[torch.Tensor] = []
                profiler.first_step(model, lambda: box.append(train_step(lb)), lb, batcher, events)
                loss = box[0]
            else:
                loss = train_step(lb)
        if profiler is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            profiler.record(time.perf_counter() - t0, int(lb.attention_mask.sum()))
        return loss, {}

    def on_log(step: int, losses: list[float], info: dict, seconds: float) -> float:
        mean_loss = dist.mean(sum(losses) / len(losses))
        if logger is not None:
            logger.log({"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                        "elapsed": round(seconds, 3)})
        return mean_loss

    last_saved: list[Path | None] = [resume_from]

    def save(step: int, info: dict, seconds: float) -> Path | None:
        extra = {"model": cfg.model_name, "train_seconds": round(seconds, 3),
                 "total_seconds": round(prior_total + time.time() - t_start, 3)}
        if fsdp:
            from .fsdp import save_sharded, weights_finite

            if not dist.all_true(weights_finite(model)):
                raise weights_diverged(step, last_saved[0])      # the shards do not say which tensor
            last_saved[0] = save_sharded(run_dir, step, model, optimizer, scheduler, extra=extra)
            return last_saved[0]
        if dist.main:
            modules = checkpoint_modules(model, cfg)
            check_finite_weights(modules, step, last_saved[0])
            last_saved[0] = save_checkpoint(run_dir, step, modules, optimizer, scheduler, extra=extra)
        dist.barrier()
        return last_saved[0]

    if profiler is not None:
        profiler.start()
    try:
        loop = train_loop(step_fn, start_step=step, total_steps=cfg.steps, log_every=cfg.log_every,
                          checkpoint_every=cfg.checkpoint_every, on_log=on_log, save=save,
                          prior_seconds=float(before.get("train_seconds", 0.0)), last_checkpoint=resume_from,
                          all_finite=dist.all_finite, desc=f"train {cfg.model_name}",
                          disable_progress=None if dist.main else True)
    finally:
        if profiler is not None:
            profiler.stop()
        if logger is not None:
            logger.close()

    results: dict = {}
    if fsdp:
        from .fsdp import unsharded

        model = unsharded(model, shadow)                      # rank 0: the trained model, whole; others: None
        if dist.main:
            model = model.to(device)
            save_checkpoint(run_dir, loop.step, checkpoint_modules(model, cfg),
                            extra={"model": cfg.model_name, "unsharded_from": str(last_saved[0])})
    if dist.main:
        losses = [r["loss"] for r in read_jsonl(run_dir / METRICS_LOG) if "loss" in r]
        first_loss, final_loss = (losses[0], losses[-1]) if losses else (None, None)
        results = evaluate_and_report(cfg, model, batcher, ds, train_ex, test_ex, device, amp, log,
                                      split="test", train_info={"steps": cfg.steps, "world_size": dist.world,
                                                                "caption_steps": cfg.caption_steps,
                                                                "distill_steps": cfg.distill_steps,
                                                                "first_loss": first_loss,
                                                                "final_loss": final_loss,
                                                                "train_seconds": round(loop.seconds, 2)})
        if cfg.distill_steps:  # does the LLM read the user for the target it was distilled on?
            from .diagnostics import context_gain
            from .distill import teacher_top1_examples

            gain = context_gain(model, batcher, ds, teacher_top1_examples(teacher, ds, test_ex),
                                batch_size=cfg.eval_batch_size, device=device, amp=amp)
            if gain is not None:
                results["test"]["teacher_top1"] = gain
                log(f"on the encoder's top-1 as the target: loss {gain['loss_own']:.3f}, gain(shuf) "
                    f"{gain['context_gain']:.3f}, gain(none) {gain['context_gain_none']:.3f}")
        results["total_seconds"] = round(prior_total + time.time() - t_start, 2)
        write_metrics(run_dir, results)
        if profiler is not None:
            log(f"wrote {profiler.write(run_dir, model, results, dist.world)}")
        log(f"wrote {run_dir}/metrics.json ({results['total_seconds']:.0f}s in all)")
    dist.barrier()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv, TrainConfig, description=__doc__.split("\n\n")[0])
    train(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
