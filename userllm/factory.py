"""Everything a run is built from, in one place (open_flamingo's ``factory.py`` is the model).

Every entry point builds through these functions: ``python -m userllm.train``, ``userllm.pretrain``,
``userllm.evaluate``, ``userllm.generate``, ``userllm.profiling.compare`` and the benchmarks.

    ds = load_data(cfg)                                  # the processed dataset (cached)
    llm, tok = build_llm(cfg, ds)                        # --llm DIR, or the embedded tiny Llama
    encoder = build_encoder(cfg, ds, run_dir)            # --encoder-checkpoint / brief pretraining / random
    model = build_model(cfg, llm, encoder)               # UserLLM or TextPromptModel, strategy applied
    batcher = make_batcher(cfg, ds, tok, model)          # token batches and prompts (one prompt path)
    run = load_run("runs/x")                             # all of the above for a finished run + checkpoint

``cfg`` is a :class:`~userllm.config.TrainConfig` (``load_data`` also takes a
:class:`~userllm.config.PretrainConfig`). Library code here raises ``ValueError`` / ``TypeError`` for bad
arguments and :class:`~userllm.errors.UserError` for bad user input (a missing file, a run directory
that is not one); only the command-line layer (:mod:`userllm.cli`) turns them into one-line exits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .config import TrainConfig
from .errors import UserError
from .loop import amp_factory, pick_device

ENCODER_FILE = "encoder.safetensors"      # the trained encoder of a pretraining run (and of the brief one)
PRETRAIN_DIR = "pretrain"                 # the brief pretraining inside a User-LLM run directory
LLM_SPEC_DIR = "llm"                      # the LLM's config + tokenizer inside a run directory
ENCODER_SPEC_FILE = "encoder.json"        # the encoder's kind + config inside a run directory


# ------------------------------------------------------------------------------------------------ data
def load_data(cfg, *, synthetic=None, use_cache: bool = True):
    """The processed dataset of ``cfg`` (``dataset``, ``data_path``, ``cache_dir``, ``min_user_events``,
    ``synthetic_*``), from the cache when possible. ``synthetic``: a SyntheticConfig in place of the one of
    ``--synthetic-*``; ``use_cache=False`` neither reads nor writes the cache."""
    from .data.dataset import load_dataset

    if synthetic is None:
        synthetic = cfg.synthetic_config()
    return load_dataset(cfg.dataset, cfg.data_path, cache_dir=cfg.cache_dir, min_user_events=cfg.min_user_events,
                        synthetic=synthetic if cfg.dataset == "synthetic" else None, use_cache=use_cache)


def cache_root(cfg, ds) -> Path:
    """Where the default tokenizer (and pretrained default LLM) are cached: beside the processed data."""
    from .data.dataset import default_cache_dir

    if ds.cache_path:
        return Path(ds.cache_path).parent
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


# ------------------------------------------------------------------------------------------------ LLM
def build_llm(cfg: TrainConfig, ds, log: Callable[..., None] | None = print, *, default_config=None):
    """``(llm, tokenizer)``: ``--llm DIR``, or the embedded default (``--llm-hidden/--llm-layers``, or
    ``default_config``): tokenizer trained on the dataset's text and, with ``--llm-pretrain-steps``, the
    model pretrained as a causal LM on that text (both cached beside the data)."""
    from .llm import DefaultLLMConfig, load_llm
    from .text_prompt import corpus_texts

    if cfg.llm is not None:
        return load_llm(cfg.llm)
    default = default_config or DefaultLLMConfig.sized(cfg.llm_hidden, cfg.llm_layers, cfg.tokenizer_vocab)
    return load_llm(None, texts=corpus_texts(ds), cache_dir=cache_root(cfg, ds), seed=cfg.seed,
                    default_config=default, pretrain_steps=cfg.llm_pretrain_steps, log=log)


def llm_max_length(llm) -> int | None:
    """The LLM's context length (``max_position_embeddings`` / ``n_positions``), None when unbounded."""
    c = llm.config
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(c, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


# ------------------------------------------------------------------------------------------------ encoder
def check_encoder_fits(encoder, ds, window: int, where: str) -> None:
    """UserError unless ``encoder`` was trained on ``ds``'s features and handles ``window`` events."""
    have = [(f.name, f.num_embeddings) for f in encoder.config.feature_specs]
    want = [(s.name, s.num_embeddings) for s in ds.feature_specs]
    if have != want:
        raise UserError(f"{where}: the encoder was trained on other data (features {have}, this dataset {want})")
    if encoder.config.max_len < window:
        raise UserError(f"{where}: the encoder handles at most {encoder.config.max_len} events but --window is "
                        f"{window}")


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


def pretrain_briefly(cfg: TrainConfig, ds, out: Path, device: torch.device, log: Callable[..., None] = print) -> Path:
    """``--pretrain-steps`` of next-event pretraining of a fresh encoder on this run's data, with the
    pretraining stage's recipe (:func:`userllm.encoders.pretraining.pretrain_encoder` on
    :meth:`TrainConfig.pretrain_config`); writes ``out/encoder.safetensors`` and ``out/pretrain.json``."""
    from .encoders import save_encoder
    from .encoders.pretraining import pretrain_encoder
    from .utils.atomic import write_json

    pcfg = cfg.pretrain_config(out)
    encoder, stats = pretrain_encoder(ds, pcfg, device, desc=f"pretrain {pcfg.encoder} encoder")
    path = out / ENCODER_FILE
    save_encoder(encoder.cpu(), path, extra=pretrain_signature(cfg))
    first, last = stats["first_loss"], stats["final_loss"]
    write_json(out / "pretrain.json", {"steps": pcfg.steps, "first_loss": first, "final_loss": last})
    log(f"pretrained the {pcfg.encoder} encoder for {pcfg.steps} steps: loss {first:.3f} -> {last:.3f} ({path})")
    return path


def build_encoder(cfg: TrainConfig, ds, run_dir: Path | None = None, *, device: torch.device | None = None,
                  is_main: bool = True, barrier: Callable[[], None] = lambda: None,
                  log: Callable[..., None] = print, **overrides) -> nn.Module:
    """The user encoder: ``--encoder-checkpoint``; else, with ``--pretrain-steps`` and a ``run_dir``,
    pretrained briefly into ``run_dir/pretrain`` (by the main process; reused when its signature matches);
    else randomly initialised (:meth:`TrainConfig.encoder_spec`, with ``overrides`` of its fields)."""
    from .encoders import build_encoder as build, load_encoder

    if cfg.encoder_checkpoint is not None:
        path = Path(cfg.encoder_checkpoint)
        if not path.is_file():
            raise UserError(f"--encoder-checkpoint {path}: file not found")
        encoder = load_encoder(path)
        check_encoder_fits(encoder, ds, cfg.window, f"--encoder-checkpoint {path}")
        return encoder
    if cfg.pretrain_steps > 0 and run_dir is not None:
        path = run_dir / PRETRAIN_DIR / ENCODER_FILE
        if is_main and pretrain_signature(cfg) != _saved_signature(path):
            pretrain_briefly(cfg, ds, run_dir / PRETRAIN_DIR, device or torch.device("cpu"), log)
        barrier()
        return load_encoder(path)
    return build(cfg.encoder, {**cfg.encoder_spec(ds), **overrides})


# ------------------------------------------------------------------------------------------------ model
def build_model(cfg: TrainConfig, llm: nn.Module, encoder: nn.Module | None) -> nn.Module:
    """The model of ``cfg``: :class:`~userllm.integration.UserLLM` (``cfg.user_llm_config()``) or, with
    ``--baseline textprompt``, :class:`~userllm.integration.TextPromptModel`; the training strategy applied
    by the same :func:`~userllm.integration.apply_strategy` (LoRA adapters injected in place)."""
    from .integration import TextPromptModel, UserLLM, apply_strategy

    if cfg.text_prompt:
        model = TextPromptModel(llm)
    else:
        if encoder is None:
            raise ValueError("a UserLLM needs a user encoder")
        model = UserLLM(llm, encoder, cfg.user_llm_config())
    return apply_strategy(model, cfg.strategy, lora_r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank,
                          freeze_encoder=cfg.freeze_encoder)


def fill_readout(model: nn.Module, ds, tok) -> None:
    """Give the readout tokens (``--readout-tokens``) each item's title vector: the mean of the LLM's
    input embeddings of the title's answer tokens (:mod:`userllm.integration.readout`), and with
    ``--readout-pointer`` the ids its copy head writes. A reloaded run needs no call: both are buffers in its
    checkpoint."""
    import numpy as np

    from .integration.readout import title_token_ids, title_vectors
    from .text_prompt import target_text

    readout = getattr(model, "readout", None)
    if readout is None:
        return
    titles = ds.item_titles(np.arange(readout.num_items))
    ids = tok([target_text(t) for t in titles[1:]], add_special_tokens=False)["input_ids"]
    readout.set_title_vectors(title_vectors(model.llm, [[]] + ids, readout.title_tokens))
    if readout.copy_head is not None:
        readout.set_title_ids(title_token_ids([[]] + ids, readout.title_tokens, tok.eos_token_id))


def checkpoint_modules(model: nn.Module, cfg: TrainConfig) -> dict[str, nn.Module]:
    """The modules a checkpoint stores: everything, except a frozen ``--llm`` (reloaded from its directory)."""
    if model.encoder is None:                               # TextPrompt: only the LLM
        return {"llm": model.llm}
    mods: dict[str, nn.Module] = {"encoder": model.encoder, "projection": model.projection}
    for name in ("perceiver", "soft_prompt"):
        if getattr(model, name) is not None:
            mods[name] = getattr(model, name)
    if len(model.xattn):
        mods["xattn"] = model.xattn
    if getattr(model, "readout", None) is not None:
        mods["readout"] = model.readout
    if cfg.llm is None or cfg.strategy in ("full", "lora"):
        mods["llm"] = model.llm
    return mods


def make_batcher(cfg: TrainConfig, ds, tok, model: nn.Module):
    """The run's :class:`~userllm.llm_data.LLMBatcher`: the prompts and targets of training, evaluation and
    generation (the history as text for TextPrompt, ``--text-events`` of it for the mixed context), cut
    to the LLM's context minus the user side's prefix positions."""
    from .llm_data import LLMBatcher

    max_len = llm_max_length(model.llm)
    if max_len is not None:
        max_len -= model.num_prefix_tokens(cfg.window)
    return LLMBatcher(ds, tok, cfg.task, text_events=None if cfg.text_prompt else cfg.text_events,
                      with_events=not cfg.text_prompt, max_target_tokens=cfg.max_target_tokens, max_length=max_len)


def set_threads(cfg: TrainConfig, device: torch.device) -> None:
    """--threads, or automatically (CPU, the embedded tiny LLM) as many threads as there are idle cores
    (:mod:`userllm.utils.cpu`: 1.5x per step on an idle 2-core machine; on a busy one, 1 thread)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu" and cfg.llm is None:
        from .utils.cpu import automatic_threads

        torch.set_num_threads(automatic_threads())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


# ------------------------------------------------------------------------------------------------ runs
def load_run_llm(cfg: TrainConfig, run: Path):
    """(llm, tokenizer) of a finished run, before its checkpoint is loaded."""
    from .llm import load_llm, load_llm_spec

    if cfg.llm is not None and not (cfg.strategy in ("full", "lora") or cfg.text_prompt):
        return load_llm(cfg.llm)                   # frozen: its weights are not in the checkpoint
    return load_llm_spec(run / LLM_SPEC_DIR)       # architecture + tokenizer; weights from the checkpoint


@dataclass
class LoadedRun:
    """A trained run rebuilt from its directory (see :func:`load_run`); ``model`` is in eval mode on ``device``."""

    run_dir: Path
    cfg: TrainConfig          # the run's options (with the overrides applied)
    checkpoint: Path
    device: torch.device
    ds: Any                   # the ProcessedDataset the run was trained on
    tok: Any                  # the run's tokenizer
    model: nn.Module          # UserLLM, or TextPromptModel (``.llm``)
    batcher: Any              # the run's LLMBatcher (prompts, targets, catalogue)
    amp: Callable[[], Any]    # autocast context factory (bf16 on GPU when the run used it)

    @property
    def user_llm(self) -> bool:
        return self.model.encoder is not None


def load_run(run_dir: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None, device: str | None = None,
             threads: int | None = None, overrides: dict[str, Any] | None = None) -> LoadedRun:
    """Rebuild a run's model from ``config.json`` + ``llm/`` + ``encoder.json`` and load a checkpoint
    (default: the latest). ``overrides``: run options to change (e.g. ``eval_users``, ``beams``; None
    values are ignored). Raises UserError for a directory that is not a run or has no checkpoint.
    The kernel backend is the caller's (the command line picks it with :func:`userllm.cli.select_kernels`)."""
    from .checkpoint import latest_checkpoint, load_checkpoint
    from .encoders import build_encoder as build
    from .runs import CONFIG_FILE, read_run_config

    run = Path(run_dir)
    if not (run / CONFIG_FILE).is_file():
        raise UserError(f"{run}: not a run directory (no config.json)")
    cfg = TrainConfig.from_dict(read_run_config(run), source=str(run / CONFIG_FILE))
    for key, value in {**(overrides or {}), "device": device, "threads": threads}.items():
        if value is not None:
            setattr(cfg, key, value)
    cfg.validate()
    dev = pick_device(cfg.device)
    set_threads(cfg, dev)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run)
    if ckpt is None:
        raise UserError(f"{run}: no checkpoint to load")
    if not ckpt.is_file():
        raise UserError(f"--checkpoint {ckpt}: file not found")
    ds = load_data(cfg)
    llm, tok = load_run_llm(cfg, run)
    encoder = None
    if not cfg.text_prompt:
        spec = json.loads((run / ENCODER_SPEC_FILE).read_text())
        encoder = build(spec["kind"], spec["config"])
    model = build_model(cfg, llm, encoder)
    load_checkpoint(ckpt, checkpoint_modules(model, cfg), restore_rng_state=False)
    model.to(dev).eval()
    batcher = make_batcher(cfg, ds, tok, model)
    return LoadedRun(run, cfg, ckpt, dev, ds, tok, model, batcher, amp_factory(dev, cfg.bf16))


def check_paths(cfg) -> None:
    """Fail fast (before loading data or models) on paths that cannot work."""
    from .llm import check_llm_dir

    if cfg.encoder_checkpoint is not None and not Path(cfg.encoder_checkpoint).is_file():
        raise UserError(f"--encoder-checkpoint {cfg.encoder_checkpoint}: file not found")
    if cfg.llm is not None:
        check_llm_dir(cfg.llm)
    if cfg.data_path is not None and not Path(cfg.data_path).exists():
        raise UserError(f"--data-path {cfg.data_path}: no such file or directory")
