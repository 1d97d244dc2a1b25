"""Stage 2 of User-LLM: train the LLM side on a task, evaluate, print a table (``python -m userllm.train``).

    python -m userllm.train                                    # synthetic data, ~5 CPU minutes end to end
    python -m userllm.train --strategy full --integration softprompt --perceiver-latents 8
    python -m userllm.train --baseline textprompt --strategy lora          # the TextPrompt baseline
    python -m userllm.train --window 50 --text-events 10                   # AR50TP10 mixed context
    python -m userllm.train --config run.yaml --resume --out runs/x        # continue a killed run
    torchrun --nproc-per-node 2 -m userllm.train ...                       # DDP (gloo on CPU, nccl on GPU)

Pipeline: load (and cache) the dataset -> LLM (``--llm DIR`` or the embedded tiny Llama whose BPE
tokenizer is trained on the dataset's text) -> user encoder (``--encoder-checkpoint``, else a brief
pretraining with :mod:`userllm.pretrain`'s recipe, else random) -> :class:`~userllm.integration.UserLLM`
with the chosen integration and training strategy -> AdamW with linear warmup + cosine decay -> evaluation
with the trie-constrained beam search (:mod:`userllm.evaluate`).

Run directory: ``config.json`` (resolved options), ``metrics.jsonl`` (training log), ``metrics.json``
(final results), ``checkpoints/step_XXXXXXXX.safetensors`` (resumable), ``llm/`` (LLM config +
tokenizer), ``encoder.json`` (encoder kind + config), ``pretrain/`` (the brief pretraining, when run) and
``profile.json`` with ``--profile``.

Resume (``--resume --out RUN_DIR``): the data order is a pure function of (seed, step) and the checkpoint
holds model, optimizer, scheduler and RNG states, so a resumed run continues with exactly the losses the
uninterrupted run would have had (on CPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .cli import run_cli
from .config import TrainConfig, parse_config
from .errors import UserError
from .evaluate import (eval_subset, format_table, generate_and_score, popularity_baseline,
                       teacher_forced_loss)
from .training import (MetricsLogger, autocast, cosine_with_warmup, optimizer_step, pick_device, progress,
                       seed_everything, write_metrics, write_run_config)
from .utils.atomic import write_json

# Options that may differ between a run and its resumption (they do not change the trained weights).
RESUMABLE_CHANGES = {"resume", "out", "device", "threads", "eval_users", "eval_batch_size", "beams", "log_every",
                     "checkpoint_every", "profile", "cache_dir", "fused_kernels"}


# ------------------------------------------------------------------------------------ distributed
@dataclass
class Dist:
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

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(cfg: TrainConfig) -> Dist:
    """One process per device under ``torchrun`` (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    device = pick_device(cfg.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.batch_size < world:
        raise UserError(f"--batch-size {cfg.batch_size} is smaller than the {world} DDP processes")
    return Dist(rank, world, device)


# ------------------------------------------------------------------------------------ components
def load_data(cfg: TrainConfig):
    from .data.dataset import load_dataset
    from .data.synthetic import SyntheticConfig

    synthetic = None
    if cfg.dataset == "synthetic":
        synthetic = SyntheticConfig(num_users=cfg.synthetic_users, num_items=cfg.synthetic_items,
                                    min_events=max(4, cfg.synthetic_events * 2 // 3),
                                    max_events=max(4, cfg.synthetic_events * 4 // 3))
    return load_dataset(cfg.dataset, cfg.data_path, cache_dir=cfg.cache_dir, min_user_events=cfg.min_user_events,
                        synthetic=synthetic)


def cache_root(cfg: TrainConfig, ds) -> Path:
    """Where the default tokenizer is cached: beside the processed data."""
    from .data.dataset import default_cache_dir

    if ds.cache_path:
        return Path(ds.cache_path).parent
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


def build_llm(cfg: TrainConfig, ds, log=print):
    """``--llm DIR``, or the embedded default: tokenizer trained on the dataset's text and, with
    ``--llm-pretrain-steps``, the model pretrained as a causal LM on that text (both cached beside the data)."""
    from .llm import DefaultLLMConfig, load_llm
    from .text_prompt import corpus_texts

    if cfg.llm is not None:
        return load_llm(cfg.llm)
    default = DefaultLLMConfig.sized(cfg.llm_hidden, cfg.llm_layers, cfg.tokenizer_vocab)
    return load_llm(None, texts=corpus_texts(ds), cache_dir=cache_root(cfg, ds), seed=cfg.seed,
                    default_config=default, pretrain_steps=cfg.llm_pretrain_steps, log=log)


def _check_encoder_fits(encoder, ds, cfg: TrainConfig, where: str) -> None:
    have = [(f.name, f.num_embeddings) for f in encoder.config.feature_specs]
    want = [(s.name, s.num_embeddings) for s in ds.feature_specs]
    if have != want:
        raise UserError(f"{where}: the encoder was trained on other data (features {have}, this dataset {want})")
    if encoder.config.max_len < cfg.window:
        raise UserError(f"{where}: the encoder handles at most {encoder.config.max_len} events but --window is "
                        f"{cfg.window}")


def pretrain_encoder(cfg: TrainConfig, ds, out: Path, device: torch.device, log=print):
    """A brief next-event pretraining of a fresh encoder with :func:`userllm.pretrain.pretrain_encoder`
    (its PretrainConfig defaults, windows, batch order, optimizer and encoder config) on this run's dataset."""
    from . import pretrain
    from .encoders import save_encoder

    pcfg = pretrain.PretrainConfig(dataset=cfg.dataset, encoder=cfg.encoder, window=cfg.window,
                                   steps=cfg.pretrain_steps, d_model=cfg.encoder_dim, layers=cfg.encoder_layers,
                                   warmup=min(50, cfg.pretrain_steps // 10), seed=cfg.seed, out=str(out))
    encoder, stats = pretrain.pretrain_encoder(ds, pcfg, device, desc=f"pretrain {pcfg.encoder} encoder")
    path = out / pretrain.ENCODER_FILE
    save_encoder(encoder.cpu(), path, extra=pretrain_signature(cfg))
    first, last = stats["first_loss"], stats["final_loss"]
    write_json(out / "pretrain.json", {"steps": pcfg.steps, "first_loss": first, "final_loss": last})
    log(f"pretrained the {pcfg.encoder} encoder for {pcfg.steps} steps: loss {first:.3f} -> {last:.3f} ({path})")
    return path


def pretrain_signature(cfg: TrainConfig) -> dict:
    """What the brief pretraining depends on: an encoder file with another signature is not reused."""
    keys = ("dataset", "data_path", "synthetic_users", "synthetic_items", "synthetic_events", "min_user_events",
            "encoder", "window", "pretrain_steps", "encoder_dim", "encoder_layers", "seed")
    return {k: getattr(cfg, k) for k in keys}


def _saved_signature(path: Path) -> dict | None:
    from .encoders import read_encoder_metadata

    if not path.is_file():
        return None
    try:
        return read_encoder_metadata(path).get("extra")
    except UserError:
        return None


def build_encoder_for(cfg: TrainConfig, ds, run_dir: Path, dist: Dist, log=print):
    """The user encoder: --encoder-checkpoint, else pretrained briefly (rank 0) into run_dir/pretrain, else random."""
    from .encoders import build_encoder, load_encoder
    from .pretrain import ENCODER_FILE

    if cfg.encoder_checkpoint is not None:
        path = Path(cfg.encoder_checkpoint)
        if not path.is_file():
            raise UserError(f"--encoder-checkpoint {path}: file not found")
        encoder = load_encoder(path)
        _check_encoder_fits(encoder, ds, cfg, f"--encoder-checkpoint {path}")
        return encoder
    if cfg.pretrain_steps > 0:
        path = run_dir / "pretrain" / ENCODER_FILE
        if dist.main and pretrain_signature(cfg) != _saved_signature(path):
            pretrain_encoder(cfg, ds, run_dir / "pretrain", dist.device, log)
        dist.barrier()
        return load_encoder(path)
    return build_encoder(cfg.encoder, dict(feature_specs=list(ds.feature_specs), d_model=cfg.encoder_dim,
                                           n_layers=cfg.encoder_layers, n_heads=2, dropout=0.1,
                                           max_len=cfg.window + 1))


class TextPromptModel(nn.Module):
    """The TextPrompt baseline: the plain LLM (history in the prompt), trained fully or with LoRA."""

    def __init__(self, llm: nn.Module):
        super().__init__()
        self.llm = llm

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        return self.llm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)


def apply_text_prompt_strategy(model: TextPromptModel, strategy: str, lora_rank: int) -> None:
    from .integration.strategies import inject_lora

    if strategy == "lora":
        inject_lora(model.llm, lora_rank, 2 * lora_rank, 0.05)
    for name, p in model.llm.named_parameters():
        p.requires_grad_(strategy == "full" or "lora_" in name)


def build_model(cfg: TrainConfig, llm, encoder) -> nn.Module:
    """UserLLM (or the TextPrompt wrapper) with the training strategy applied (LoRA adapters injected)."""
    if cfg.baseline == "textprompt":
        model = TextPromptModel(llm)
        apply_text_prompt_strategy(model, cfg.strategy, cfg.lora_rank)
        return model
    from .integration import UserLLM, UserLLMConfig, apply_strategy

    # Closed gates (tanh(0) = 0) keep a pretrained LLM intact at init, but their gradient is then pure
    # noise (the blocks behind them are random and get no gradient): with the random embedded LLM they
    # stayed shut (|gate| < 0.01 after 300 steps). Slightly open gates let the blocks learn from the
    # first step; wide open ones (1.0) inject so much noise that the LM itself learns slower.
    gate = cfg.xattn_gate_init if cfg.xattn_gate_init is not None else (0.0 if cfg.llm is not None else 0.1)
    ucfg = UserLLMConfig(integration=cfg.integration, xattn_every=cfg.xattn_every,
                         perceiver_latents=cfg.perceiver_latents, perceiver_layers=cfg.perceiver_layers,
                         task_prompt_len=cfg.soft_prompt_tokens, gate_init=gate)
    model = UserLLM(llm, encoder, ucfg)
    apply_strategy(model, cfg.strategy, lora_r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank)
    return model


def checkpoint_modules(model: nn.Module, cfg: TrainConfig) -> dict[str, nn.Module]:
    """The modules a checkpoint stores: everything, except a frozen ``--llm`` (reloaded from its directory)."""
    if isinstance(model, TextPromptModel):
        return {"llm": model.llm}
    mods: dict[str, nn.Module] = {"encoder": model.encoder, "projection": model.projection}
    for name in ("perceiver", "soft_prompt"):
        if getattr(model, name) is not None:
            mods[name] = getattr(model, name)
    if len(model.xattn):
        mods["xattn"] = model.xattn
    if cfg.llm is None or cfg.strategy in ("full", "lora"):
        mods["llm"] = model.llm
    return mods


def llm_max_length(llm) -> int | None:
    c = llm.config
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(c, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def make_batcher(cfg: TrainConfig, ds, tok, model):
    from .llm_data import LLMBatcher

    text_prompt = cfg.baseline == "textprompt"
    max_len = llm_max_length(model.llm)
    if max_len is not None and not text_prompt:
        max_len -= model.num_prefix_tokens(cfg.window)
    return LLMBatcher(ds, tok, cfg.task, text_events=None if text_prompt else cfg.text_events,
                      with_events=not text_prompt, max_target_tokens=cfg.max_target_tokens, max_length=max_len)


def select_kernels(cfg: TrainConfig, device: torch.device) -> str:
    """Route the three ops: the reference ops unless --fused-kernels; then Triton on CUDA, native on CPU.

    Returns a one-line description of the path taken (printed once by rank 0).
    """
    from .kernels import use_backend
    from .kernels import dispatch

    if not cfg.fused_kernels:
        use_backend("reference")
        return "kernels: PyTorch reference ops (pass --fused-kernels for the fused ones)"
    if device.type == "cuda":
        if dispatch._triton_importable():
            use_backend("triton")
            return "kernels: fused Triton kernels on CUDA"
        use_backend("reference")
        return "kernels: --fused-kernels asked for Triton, which is not installed; using the PyTorch reference ops"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        native = dispatch.native_available(device.type)
    if native:
        use_backend("native")
        return ("kernels: native C++ embedding_concat on CPU (the attention ops have no CPU kernel and use "
                "the PyTorch reference)")
    use_backend("reference")
    return "kernels: --fused-kernels: the native CPU library is not built; using the PyTorch reference ops"


def set_threads(cfg: TrainConfig, device: torch.device) -> None:
    """--threads, or automatically 1 thread for the embedded tiny LLM on CPU.

    Measured on 2 shared cores: a training step of the default model took ~0.16 s of CPU with 1 thread
    and ~1.2 s with 2 (the threads spin on matmuls far too small to split).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu" and cfg.llm is None:
        torch.set_num_threads(1)


def check_paths(cfg: TrainConfig) -> None:
    """Fail fast (before loading data or models) on paths that cannot work."""
    from .llm import check_llm_dir

    if cfg.encoder_checkpoint is not None and not Path(cfg.encoder_checkpoint).is_file():
        raise UserError(f"--encoder-checkpoint {cfg.encoder_checkpoint}: file not found")
    if cfg.llm is not None:
        check_llm_dir(cfg.llm)
    if cfg.data_path is not None and not Path(cfg.data_path).exists():
        raise UserError(f"--data-path {cfg.data_path}: no such file or directory")


# ------------------------------------------------------------------------------------ run directory
def prepare_run_dir(cfg: TrainConfig, dist: Dist) -> tuple[Path, Path | None, bool]:
    """(run_dir, checkpoint to resume from or None, resuming?) with the resume rules enforced."""
    if cfg.out is None:
        if cfg.resume:
            raise UserError("--resume needs --out RUN_DIR (the run to continue)")
        stamp = dist.broadcast(time.strftime("%Y%m%d-%H%M%S"))
        out = Path("runs") / f"{cfg.dataset}-{cfg.task}-{cfg.model_name}-{stamp}"
    else:
        out = Path(cfg.out)
    ckpt = latest_checkpoint(out)
    if not cfg.resume:
        if ckpt is not None or (out / "metrics.json").exists():
            raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        return out, None, False
    if not (out / "config.json").is_file():
        raise UserError(f"--resume: {out} has no config.json (not a run directory)")
    saved = json.loads((out / "config.json").read_text())
    current = cfg.to_dict()
    diff = sorted(k for k in current if k not in RESUMABLE_CHANGES and k in saved and saved[k] != current[k])
    if diff:
        raise UserError("--resume: options differ from the run being resumed: " +
                        ", ".join(f"{k} ({saved[k]!r} -> {current[k]!r})" for k in diff))
    return out, ckpt, True


def batch_for_step(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Example indices of the global batch of ``step``: epoch e is a permutation drawn from (seed, e), so
    the data position is a pure function of the step (exact resume). Partial last batches are dropped."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[i * batch_size:(i + 1) * batch_size]


def forward_loss(model, lb) -> torch.Tensor:
    if lb.events is not None:
        out = model(input_ids=lb.input_ids, attention_mask=lb.attention_mask, features=lb.events.features,
                    lengths=lb.events.lengths, labels=lb.labels)
    else:
        out = model(input_ids=lb.input_ids, attention_mask=lb.attention_mask, labels=lb.labels)
    return out.loss


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


# ------------------------------------------------------------------------------------ training
def train(cfg: TrainConfig) -> dict:
    """Run the whole stage; returns the final metrics (rank 0; {} on other ranks)."""
    check_paths(cfg)
    dist = init_distributed(cfg)
    log = print if dist.main else (lambda *a, **k: None)
    device = dist.device
    set_threads(cfg, device)
    run_dir, resume_from, resuming = prepare_run_dir(cfg, dist)
    seed_everything(cfg.seed)
    log(select_kernels(cfg, device), flush=True)
    amp = (lambda: autocast(device)) if cfg.bf16 else contextlib.nullcontext
    t_start = time.time()

    # Data and the LLM: rank 0 builds the caches first, the others then read them.
    if dist.main:
        ds = load_data(cfg)
        llm, tok = build_llm(cfg, ds, log)
    dist.barrier()
    if not dist.main:
        ds = load_data(cfg)
        llm, tok = build_llm(cfg, ds, log)
    from .data.examples import collate, make_examples

    train_ex = make_examples(ds, cfg.task, cfg.window, "train")
    if cfg.max_train_examples:
        train_ex = eval_subset(train_ex, cfg.max_train_examples, seed=cfg.seed)
    test_ex = eval_subset(make_examples(ds, cfg.task, cfg.window, "test"), cfg.eval_users)
    if len(train_ex) == 0:
        raise UserError(f"the {cfg.dataset} dataset has no {cfg.task} training examples")
    log(f"data: {cfg.dataset}: {ds.num_users} users, {ds.num_items - 1} items, {ds.num_events} events; "
        f"{cfg.task}: {len(train_ex)} train examples, {len(test_ex)} test users "
        f"({time.time() - t_start:.1f}s)", flush=True)
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resuming:
            write_run_config(run_dir, cfg.to_dict() | {"out": str(run_dir)})
        from .llm import describe_llm, save_llm_spec

        save_llm_spec(run_dir / "llm", llm, tok)
        log(f"llm: {cfg.llm or 'embedded default'}: {describe_llm(llm)}, tokenizer {len(tok)} tokens", flush=True)

    encoder = None
    if cfg.baseline != "textprompt":
        encoder = build_encoder_for(cfg, ds, run_dir, dist, log)
        if dist.main:
            write_json(run_dir / "encoder.json", {"kind": encoder.kind, "config": encoder.config.to_dict()})
    model = build_model(cfg, llm, encoder).to(device)
    trainable, total = count_parameters(model)
    log(f"model: {cfg.model_name}: {trainable / 1e6:.3f}M of {total / 1e6:.3f}M parameters trainable", flush=True)
    batcher = make_batcher(cfg, ds, tok, model)

    params = [p for p in model.parameters() if p.requires_grad]
    # The fused AdamW kernel (CPU and CUDA) is ~2x cheaper than the per-tensor loop for many small tensors.
    fused = device.type in ("cpu", "cuda") and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=fused)
    scheduler = cosine_with_warmup(optimizer, cfg.warmup, cfg.steps, cfg.min_lr_ratio if cfg.cosine else 1.0)
    step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, checkpoint_modules(model, cfg), optimizer, scheduler)
        step = state.step
        log(f"resumed from {resume_from} at step {step}", flush=True)
    elif resuming:
        log(f"--resume: no checkpoint in {run_dir} yet; starting at step 0", flush=True)
    if step > cfg.steps:
        raise UserError(f"--steps {cfg.steps}: the run is already at step {step}")
    ddp_model = model
    if dist.world > 1:
        # Every trainable parameter is in the graph of every step (apply_strategy freezes the encoder's
        # pretraining-only heads), so DDP needs no find_unused_parameters traversal.
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    logger = MetricsLogger(run_dir / "metrics.jsonl", resume_step=step if resuming else None) if dist.main else None
    model.train()
    bar = progress(total=cfg.steps, initial=step, desc=f"train {cfg.model_name}", disable=None if dist.main else True)
    window_losses: list[float] = []
    first_loss = None
    profiler = TrainProfiler(cfg, device) if cfg.profile and dist.main else None

    def train_step(lb) -> torch.Tensor:
        with amp():
            loss = forward_loss(ddp_model, lb)
        optimizer_step(loss, optimizer, scheduler, params, cfg.grad_clip)
        return loss

    if profiler is not None:
        profiler.start()
    t_train = time.time()
    while step < cfg.steps:
        t0 = time.perf_counter()
        idx = batch_for_step(len(train_ex), step, cfg.batch_size, cfg.seed)[dist.rank::dist.world]
        events = collate(ds, train_ex, idx)
        lb = batcher.train_batch(events).to(device)
        if profiler is not None and profiler.train_step is None:
            box: list[torch.Tensor] = []
            profiler.first_step(model, lambda: box.append(train_step(lb)), lb, batcher, events)
            loss = box[0]
        else:
            loss = train_step(lb)
        step += 1
        if profiler is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            profiler.record(time.perf_counter() - t0, int(lb.attention_mask.sum()))
        window_losses.append(loss.item())
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            mean_loss = dist.mean(sum(window_losses) / len(window_losses))
            first_loss = mean_loss if first_loss is None else first_loss
            window_losses.clear()
            if logger is not None:
                logger.log({"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                            "elapsed": round(time.time() - t_train, 3)})
            bar.set_postfix(loss=f"{mean_loss:.3f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            if dist.main:
                save_checkpoint(run_dir, step, checkpoint_modules(model, cfg), optimizer, scheduler,
                                extra={"model": cfg.model_name})
            dist.barrier()
    bar.close()
    train_seconds = time.time() - t_train
    if profiler is not None:
        profiler.stop()
    final_loss = None
    if logger is not None:
        logger.close()
        from .training import read_jsonl

        losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
        first_loss, final_loss = (losses[0], losses[-1]) if losses else (None, None)

    results: dict = {}
    if dist.main:
        results = evaluate_and_report(cfg, model, batcher, ds, train_ex, test_ex, device, amp, log,
                                      split="test", train_info={"steps": cfg.steps, "world_size": dist.world,
                                                                "first_loss": first_loss,
                                                                "final_loss": final_loss,
                                                                "train_seconds": round(train_seconds, 2)})
        results["total_seconds"] = round(time.time() - t_start, 2)
        write_metrics(run_dir, results)
        if profiler is not None:
            log(f"wrote {profiler.write(run_dir, model, results, dist.world)}")
        log(f"wrote {run_dir}/metrics.json ({results['total_seconds']:.0f}s in all)")
    dist.barrier()
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return results


def evaluate_and_report(cfg, model, batcher, ds, train_ex, test_ex, device, amp, log, split: str,
                        train_info: dict | None = None) -> dict:
    model.eval()
    metrics = generate_and_score(model, batcher, ds, test_ex, beams=cfg.beams, batch_size=cfg.eval_batch_size,
                                 device=device, amp=amp, max_new_tokens=cfg.max_target_tokens)
    metrics["loss"] = teacher_forced_loss(model, batcher, ds, test_ex, cfg.eval_batch_size, device, amp)
    rows = [{"model": cfg.model_name, "task": cfg.task, **metrics}]
    results = {"model": cfg.model_name, "task": cfg.task, "dataset": cfg.dataset, "split": split,
               "window": cfg.window, split: metrics}
    if train_info:
        results["train"] = train_info
    if batcher.catalogue is not None:
        pop = popularity_baseline(ds, train_ex, test_ex, batcher.catalogue)
        results["baselines"] = {"popularity": pop}
        rows.append({"model": "popularity", "task": cfg.task, **pop})
    what = (f"constrained beam search, {cfg.beams} beams" if batcher.catalogue is not None
            else f"greedy decoding, at most {cfg.max_target_tokens} tokens")
    log("")
    log(format_table(rows, f"{cfg.dataset} {split} split, {metrics['count']} users, window {cfg.window} ({what})"))
    if train_info and train_info.get("first_loss") is not None:
        log(f"training: {train_info['steps']} steps, loss {train_info['first_loss']:.3f} -> "
            f"{train_info['final_loss']:.3f} in {train_info['train_seconds']:.0f}s; "
            f"decoding {metrics['decode_seconds']:.0f}s")
    for s in metrics.get("samples", [])[:3]:
        log(f"  e.g. reference {s.get('reference')!r}: " +
            (f"top-3 {s['top3']}" if "top3" in s else f"generated {s['generated']!r}"))
    return results


class TrainProfiler:
    """``--profile``: what ``profile.json`` holds for a training run (rank 0), through :mod:`userllm.profiling`.

    * FLOPs of the first training step of this process, per component (LLM, encoder, projection, Perceiver,
      cross-attention; forward/backward), measured with ``FlopCounterMode``
      (:func:`userllm.profiling.compare.profile_training_step`) next to the analytic 6ND-style estimate
      for the same batch shape;
    * step times of the later steps (the FLOP-counted first step is slower and is left out), tokens/s
      (LLM input tokens incl. padding, per rank), peak memory (CUDA allocated on GPU, else the process's
      peak RSS during training), NVML utilisation / power / energy sampled during training on an NVIDIA
      GPU (without one, the reason is recorded and CPU time is still reported);
    * LLM context tokens per example (prompt + soft-prompt positions) and the evaluation's decode time.

    Written with :func:`userllm.profiling.compare.write_profile` under ``run``, ``tokens``, ``train_step``
    and ``evaluation``, so ``python -m userllm.profiling.report RUN_DIR`` reads it (``run.method`` /
    ``run.history_length`` pair User-LLM and TextPrompt runs by ``--window``).
    """

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.train_step: dict | None = None       # the FLOPs section, once the first step is counted
        self.shape: dict | None = None
        self.tokens: dict | None = None
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []
        self._stack = contextlib.ExitStack()

    def start(self) -> None:
        """Start the NVML sampler and the peak-memory / CPU-time window (call before the training loop)."""
        from .profiling.gpu import GpuSampler
        from .profiling.timing import Timer

        self.sampler = self._stack.enter_context(GpuSampler(interval_s=0.05))
        self.timer = self._stack.enter_context(Timer(self.device))

    def stop(self) -> None:
        self._stack.close()

    def first_step(self, model: nn.Module, step_fn, lb, batcher, events) -> None:
        """Run ``step_fn`` (one real training step on ``lb``) counting its FLOPs per component."""
        from .profiling.compare import profile_training_step
        from .profiling.flops import PassShape, analytic_userllm
        from .profiling.tokens import TokenCount, summarize

        B, T = lb.input_ids.shape
        L = int(lb.events.features[0].shape[1]) if lb.events is not None else 0
        target = model.llm if isinstance(model, TextPromptModel) else model
        self.train_step = profile_training_step(step_fn, target, device=self.device, steps=0,
                                                analytic=analytic_userllm(target, PassShape(B, T, L), phase="train"))
        self.shape = {"batch": B, "text_len": T, "n_events": L}
        # LLM context per example at inference: BOS + prompt (+ soft-prompt positions), as the model sees it.
        prompt = batcher.prompt_batch(events)
        n_events = events.lengths.tolist()
        method = "textprompt" if isinstance(model, TextPromptModel) else "userllm"
        self.tokens = summarize([TokenCount(method, n, int(t), 0 if method == "textprompt" else
                                            model.num_prefix_tokens(n))
                                 for n, t in zip(n_events, prompt.attention_mask.sum(1).tolist())])

    def record(self, seconds: float, tokens: int) -> None:
        self.step_times.append(seconds)
        self.step_tokens.append(tokens)

    def write(self, run_dir: Path, model: nn.Module, results: dict, world: int) -> Path:
        from .profiling.compare import environment, write_profile

        cfg = self.cfg
        times = self.step_times[1:]             # the first (FLOP-counted) step is not timed
        tokens = self.step_tokens[1:]
        gpu = self.sampler.report()
        t = self.timer.result
        timing = {"repeats": len(times), "wall_s": statistics.median(times) if times else None,
                  "wall_s_mean": statistics.fmean(times) if times else None,
                  "wall_s_min": min(times) if times else None, "wall_s_all": [round(x, 6) for x in times],
                  "cpu_s_total": t.cpu_s, "wall_s_total": t.wall_s, "peak_mem_bytes": t.peak_mem_bytes,
                  "peak_rss_bytes": t.peak_rss_bytes, "rss_peak_scope": t.rss_peak_scope, "gpu": gpu.to_dict(),
                  "energy_j": None if gpu.energy_j is None else gpu.energy_j / max(len(self.step_times), 1),
                  "energy": "n/a (no NVIDIA GPU)" if not gpu.available else (
                      "n/a (energy not supported by this GPU)" if gpu.energy_j is None else "per step, "
                      "averaged over every training step")}
        train_step = {**(self.train_step or {}), "shape": self.shape, "timing": timing,
                      "tokens_per_step": statistics.fmean(tokens) if tokens else None,
                      "tokens_per_s": sum(tokens) / sum(times) if times and sum(times) > 0 else None,
                      "strategy": cfg.strategy}
        method = "textprompt" if isinstance(model, TextPromptModel) else "userllm"
        run = {"method": method, "history_length": cfg.window, "batch_size": (self.shape or {}).get("batch"),
               "global_batch_size": cfg.batch_size, "world_size": world, "task": cfg.task, "dataset": cfg.dataset,
               "model": cfg.model_name, "strategy": cfg.strategy,
               "integration": cfg.integration if method == "userllm" else None,
               "perceiver_latents": cfg.perceiver_latents if method == "userllm" else None,
               "task_prompt_len": cfg.soft_prompt_tokens if method == "userllm" else None,
               "llm": cfg.llm or "<default>", "llm_params": int(sum(p.numel() for p in model.parameters())),
               "kernels": cfg.fused_kernels, "source": "python -m userllm.train --profile",
               **environment(self.device)}
        split = results.get("split", "test")
        evaluation = {"split": split, "decode_seconds": results.get(split, {}).get("decode_seconds"),
                      "users": results.get(split, {}).get("count")}
        return write_profile(run_dir, run=run, tokens=self.tokens, train_step=train_step, evaluation=evaluation)


# ------------------------------------------------------------------------------------ re-evaluation
def load_run_llm(cfg: TrainConfig, run: Path):
    """(llm, tokenizer) of a finished run, before its checkpoint is loaded."""
    from .llm import load_llm, load_llm_spec

    if cfg.llm is not None and not (cfg.strategy in ("full", "lora") or cfg.baseline == "textprompt"):
        llm, tok = load_llm(cfg.llm)            # frozen: its weights are not in the checkpoint
    else:
        llm, tok = load_llm_spec(run / "llm")   # architecture + tokenizer; weights from the checkpoint
    return llm, tok


def evaluate_run(run_dir: str | os.PathLike, *, checkpoint: str | None = None, eval_users: int | None = None,
                 beams: int | None = None, split: str = "test", device: str | None = None,
                 threads: int | None = None) -> dict:
    """Rebuild a run's model from its directory, load a checkpoint, evaluate, write ``eval.json``."""
    from .data.examples import make_examples
    from .evaluate import load_run

    r = load_run(run_dir, checkpoint=checkpoint, device=device, threads=threads,
                 overrides={"eval_users": eval_users, "beams": beams})
    cfg, ds = r.cfg, r.ds
    train_ex = make_examples(ds, cfg.task, cfg.window, "train")
    test_ex = eval_subset(make_examples(ds, cfg.task, cfg.window, split), cfg.eval_users)
    results = evaluate_and_report(cfg, r.model, r.batcher, ds, train_ex, test_ex, r.device, r.amp, print,
                                  split=split)
    results["checkpoint"] = str(r.checkpoint)
    write_json(r.run_dir / "eval.json", results)
    print(f"wrote {r.run_dir / 'eval.json'}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv, prog="python -m userllm.train",
                       description=__doc__.split("\n\n")[0])
    train(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
