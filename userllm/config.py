"""The option spine: every option of ``python -m userllm.train`` (:class:`TrainConfig`) and of
``python -m userllm.pretrain`` (:class:`PretrainConfig`), from the command line and/or a file.

Both are :class:`Options` dataclasses: the argparse parser is generated from the fields (name ``foo_bar``
-> ``--foo-bar``; help text, choices, bounds and whether an option may change on ``--resume`` come from
the field metadata, see :func:`opt`), so the CLI, the config files and ``config.json`` of a run are always
the same set of keys. Precedence: field defaults < ``--config FILE`` (YAML or JSON) < explicit
command-line options. Unknown keys and bad values raise :class:`~userllm.errors.UserError` naming the key.

The choices are defined where their concept lives (``TASKS`` in :mod:`userllm.data.examples`,
``STRATEGIES`` in :mod:`userllm.integration.names`, ...) and only imported here. Configs that other
parts need are derived, never translated by hand: :meth:`TrainConfig.user_llm_config` (the
:class:`~userllm.integration.UserLLMConfig`), :meth:`TrainConfig.pretrain_config` (the brief encoder
pretraining), :meth:`TrainConfig.synthetic_config` / :meth:`PretrainConfig.synthetic_config`.
"""

from __future__ import annotations

import argparse
import json
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Sequence

from .data.dataset import DATASET_NAMES as DATASETS
from .data.examples import TASKS
from .decoding import DECODERS
from .distributed import PARALLELISMS
from .encoders import ENCODERS as _ENCODER_CLASSES
from .errors import UserError
from .integration.names import INTEGRATIONS, STRATEGIES

ENCODERS = tuple(_ENCODER_CLASSES)
BASELINES = ("none", "textprompt")

__all__ = ["Options", "TrainConfig", "PretrainConfig", "opt", "build_parser", "parse_config", "read_config_file",
           "DATASETS", "TASKS", "ENCODERS", "INTEGRATIONS", "STRATEGIES", "BASELINES"]


def opt(default: Any, help: str, *, choices: Sequence[Any] | None = None, min: float | None = None,
        max: float | None = None, resumable: bool = False) -> Any:
    """A dataclass field with CLI metadata. ``resumable``: the option may differ between a run and its
    ``--resume`` (it does not change the weights trained so far)."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": min, "max": max,
                                            "resumable": resumable})


@dataclass
class Options:
    """Base of the option dataclasses: checks from the field metadata (then :meth:`check` for the rules
    across fields) at construction, the dict round trip, and the resume rules."""

    PROG: ClassVar[str] = "python -m userllm"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_fields(self)
        self.check()

    def check(self) -> None:
        """Rules across fields (subclasses); raise UserError naming the flag."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config"):
        names = {f.name for f in fields(cls)}
        for key in d:
            if key not in names:
                raise UserError(f"{source}: unknown key {key!r}" + _suggest(key, names))
        return cls(**d)

    @classmethod
    def resumable_options(cls) -> frozenset[str]:
        """Options that may differ between a run and its resumption."""
        return frozenset(f.name for f in fields(cls) if f.metadata.get("resumable"))

    def resume_differences(self, saved: dict[str, Any]) -> list[str]:
        """``"key (old -> new)"`` for every non-resumable option that differs from a run's saved config."""
        current = self.to_dict()
        keys = sorted(k for k in current if k not in self.resumable_options() and k in saved
                      and saved[k] != current[k])
        return [f"{k} ({saved[k]!r} -> {current[k]!r})" for k in keys]

    def synthetic_config(self):
        """The :class:`~userllm.data.SyntheticConfig` of ``--synthetic-*`` (None for the real datasets)."""
        from .data.synthetic import SyntheticConfig

        if self.dataset != "synthetic":
            return None
        return SyntheticConfig(num_users=self.synthetic_users, num_items=self.synthetic_items,
                               min_events=max(4, self.synthetic_events * 2 // 3),
                               max_events=max(4, self.synthetic_events * 4 // 3))


@dataclass
class DataOptions(Options):
    """The dataset options both stages share (one loader: :func:`userllm.factory.load_data`)."""

    dataset: str = opt("synthetic", "dataset reader", choices=DATASETS)
    data_path: str | None = opt(None, "path of the raw dataset (not needed for synthetic)")
    cache_dir: str | None = opt(None, "processed-data cache directory (default: $USERLLM_CACHE or "
                                "~/.cache/userllm)", resumable=True)
    synthetic_users: int = opt(300, "synthetic data: users", min=1)
    synthetic_items: int = opt(400, "synthetic data: items", min=2)
    synthetic_events: int = opt(60, "synthetic data: mean events per user (uniform in [2/3, 4/3] of it)", min=6)
    min_user_events: int = opt(5, "drop users with fewer events (leave-last-out needs >= 3)", min=3)
    workers: int = opt(0, "DataLoader worker processes gathering training batches ahead of the step "
                       "(0 = in the training process); the batches are the same either way", min=0,
                       resumable=True)


@dataclass
class TrainConfig(DataOptions):
    """Options of ``python -m userllm.train`` (defaults: a ~5 minute CPU run on the synthetic data)."""

    PROG: ClassVar[str] = "python -m userllm.train"

    task: str = opt("nextitem", "task: next-item title, favorite genre/category, or review generation",
                    choices=TASKS)
    window: int = opt(10, "history length N: events before the target given to the model", min=1)
    # user encoder
    encoder: str = opt("ar", "user encoder: autoregressive transformer or dual tower", choices=ENCODERS)
    encoder_checkpoint: str | None = opt(None, "pretrained encoder checkpoint (default: pretrain one briefly)")
    pretrain_steps: int = opt(150, "encoder pretraining steps when no --encoder-checkpoint is given "
                              "(0 = random init)", min=0)
    encoder_dim: int = opt(64, "encoder width d_model", min=8)
    encoder_layers: int = opt(2, "encoder transformer layers", min=1)
    # integration
    integration: str = opt("xattn", "how user embeddings enter the LLM: gated cross-attention or soft prompt",
                           choices=INTEGRATIONS)
    xattn_every: int = opt(1, "insert a cross-attention block every k decoder layers", min=1)
    xattn_gate_init: float | None = opt(None, "initial value of the cross-attention tanh gates (default: 0, "
                                        "Flamingo-style, with --llm; 0.1 for the embedded random LLM, whose "
                                        "closed gates would barely open in a short run)")

    @property
    def gate_init(self) -> float:
        """The gate-init policy of ``--xattn-gate-init``. Closed gates (tanh(0) = 0) keep a pretrained LLM
        intact at init, but their gradient is then pure noise (the blocks behind them are random and get
        no gradient): with the random embedded LLM they stayed shut (|gate| < 0.01 after 300 steps).
        Slightly open gates let the blocks learn from the first step; wide open ones (1.0) inject so much
        noise that the LM itself learns slower."""
        if self.xattn_gate_init is not None:
            return self.xattn_gate_init
        return 0.0 if self.llm is not None else 0.1

    perceiver_latents: int = opt(0, "Perceiver resampler latents (0 = no resampler)", min=0)
    perceiver_layers: int = opt(1, "Perceiver resampler layers", min=1)
    readout_tokens: int = opt(0, "also give the LLM the encoder's K best next-item candidates as user tokens "
                              "(0 = the paper's per-event tokens only; userllm.integration.readout)", min=0)
    readout_title_tokens: int = opt(0, "readout: tokens per candidate, one per title token with the token "
                                    "before it (0 = one token per candidate, its title's mean embedding)", min=0)
    readout_pointer: bool = opt(False, "readout: a pointer (copy) head, so that the LLM can write a readout title "
                                "token by pointing at it, mixed into its next-token distribution as in a "
                                "pointer-generator (needs --readout-title-tokens P > 0 and --integration xattn; "
                                "userllm.integration.copy_head)")
    soft_prompt_tokens: int = opt(4, "learned task-prompt tokens (soft-prompt integration)", min=0)
    strategy: str = opt("full", "trainable parts: full (everything), lora (LoRA on the LLM + encoder + "
                        "projections), enc (encoder + integration), proj (integration only); with the embedded "
                        "default LLM the frozen-LLM strategies need --llm-pretrain-steps > 0",
                        choices=STRATEGIES)
    lora_rank: int = opt(8, "LoRA rank (strategy lora)", min=1)
    freeze_encoder: bool = opt(False, "keep the user encoder at its pretrained weights under --strategy full or "
                               "lora (co-training moves it away from what it knew, issue 14; enc trains it by "
                               "definition and proj never does)")
    baseline: str = opt("none", "textprompt = the TextPrompt baseline: history as text, no user encoder",
                        choices=BASELINES)
    text_events: int = opt(0, "also render the last n window events as text (User-LLM mixed context, "
                           "e.g. AR50TP10 = --window 50 --text-events 10)", min=0)
    # LLM
    llm: str | None = opt(None, "local Hugging Face causal-LM directory (default: embedded tiny Llama)")
    llm_hidden: int = opt(128, "embedded default LLM: width (heads of 32 dims below 512, of 64 from 512; "
                          "half as many KV heads)", min=32)
    llm_layers: int = opt(2, "embedded default LLM: decoder layers", min=1)
    tokenizer_vocab: int = opt(2048, "embedded default LLM: BPE vocabulary size", min=300)
    llm_pretrain_steps: int = opt(300, "embedded default LLM: causal-LM pretraining steps on the dataset's own "
                                  "text (titles, categories, reviews, prompt templates) before User-LLM training, "
                                  "cached beside the tokenizer; makes the frozen-LLM strategies (enc/proj/lora) "
                                  "usable (0 = random LLM)", min=0)
    max_target_tokens: int = opt(32, "maximum target tokens (review generation)", min=1)
    # optimisation
    # 600, not 1000, so that the main job fits its 5 minutes on 2 cores with an empty cache: 1000 steps took
    # 215-232 s of its 330-354 s on 2026-12-02 (README, "What the main job prints").
    steps: int = opt(600, "training steps; may be changed on --resume (the learning-rate schedule is "
                     "always the one of the final --steps)", min=1, resumable=True)
    stride: int = opt(1, "rows between training targets of a user, counted back from the newest (1 = every "
                            "train event is a target: the paper's windows; 19.6M on MovieLens-20M at window 50)",
                            min=1)
    caption_steps: int = opt(0, "NextItem with --readout-tokens K: the first N of --steps are a caption stage: "
                             "K random catalogue items take the places and scores of the readout's K candidates "
                             "and the label is drawn among them as --distill-temperature says, so the LLM learns "
                             "to write the title a readout token stands for (userllm.distill; 0 = off)", min=0)
    caption_replace: int = opt(0, "caption stage: how many of the readout's K candidates (the best first) random "
                               "items replace (0 = all K)", min=0)
    caption_temperature: float | None = opt(None, "caption stage: softmax temperature of the label's draw over the "
                                            "K candidates' scores (0 = always the first; default: "
                                            "--distill-temperature)", min=0.0)
    caption_temperature_end: float | None = opt(None, "caption stage: the temperature goes linearly from "
                                                "--caption-temperature at its first step to this at its last, a "
                                                "curriculum: a steep profile starts the copy, a flat one spreads "
                                                "the LLM's beams over all K candidates (default: constant)", min=0.0)
    distill_steps: int = opt(0, "NextItem: the N steps after the caption stage (from step 0 without one) train on "
                             "the frozen pretrained encoder's "
                             "next-item draws (see --distill-topk/--distill-temperature) instead of the true next "
                             "items, so that the target is a function of the user tokens (userllm.distill; "
                             "0 = off, the paper's training)", min=0)
    distill_topk: int = opt(10, "distillation: draw the target among the encoder's K best next items", min=1)
    distill_temperature: float = opt(1.0, "distillation (and the caption stage without "
                                     "--caption-temperature): softmax temperature of the draw over the top K "
                                     "(0 = always the encoder's top-1)", min=0.0)
    max_train_examples: int = opt(0, "train on a fixed random subset of this many examples (0 = all; "
                                  "small values overfit on purpose, for debugging)", min=0)
    batch_size: int = opt(64, "global batch size (split across DDP ranks)", min=1)
    lr: float = opt(3e-3, "peak learning rate", min=0.0)
    warmup: int = opt(20, "linear warmup steps", min=0)
    cosine: bool = opt(True, "cosine decay to min_lr_ratio * lr after warmup (else constant)")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of --lr", min=0.0, max=1.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0.0)
    grad_clip: float = opt(1.0, "gradient-norm clipping (0 = off)", min=0.0)
    bf16: bool = opt(True, "bf16 autocast (GPU only; CPU always runs float32)")
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "device: auto, cpu, cuda, cuda:N", resumable=True)
    distributed: str = opt("ddp", "multi-process training under torchrun: ddp (every process holds the whole "
                           "model) or fsdp (FSDP2: parameters, gradients and optimizer state sharded per decoder "
                           "layer and cross-attention block, for LLMs whose full fine-tuning does not fit one "
                           "device; sharded checkpoints)", choices=PARALLELISMS)
    threads: int = opt(0, "torch CPU threads; 0 = automatic: for the embedded tiny LLM on CPU, the cores "
                       "idle at start (OMP_NUM_THREADS when set; userllm.utils.cpu), else torch's default",
                       min=0, resumable=True)
    # run
    out: str | None = opt(None, "run directory (default: runs/<dataset>-<task>-<model>-<time>)", resumable=True)
    resume: bool = opt(False, "continue the run in --out from its latest checkpoint", resumable=True)
    checkpoint: str | None = opt(None, "with --resume: the checkpoint to continue from (default: the newest "
                                 "in the run's checkpoints/), e.g. the last good one when the newest is damaged",
                                 resumable=True)
    checkpoint_every: int = opt(250, "save a checkpoint every n steps (and at the end)", min=1, resumable=True)
    log_every: int = opt(20, "log training metrics every n steps", min=1, resumable=True)
    fused_kernels: bool = opt(False, "route embedding_concat / latent / cached cross-attention through "
                              "the fused kernels (triton on CUDA, native on CPU) when available", resumable=True)
    compile: bool = opt(False, "torch.compile (fullgraph) the blocks calling the fused ops: cross-attention, "
                        "Perceiver, event embedding (userllm.kernels.compile)", resumable=True)
    profile: bool = opt(False, "write profile.json (step times, tokens/s, peak memory)", resumable=True)
    # evaluation
    eval_users: int = opt(200, "evaluate on at most this many test users (0 = all)", min=0, resumable=True)
    eval_batch_size: int = opt(32, "evaluation batch size", min=1, resumable=True)
    beams: int = opt(10, "beam width of the constrained decoder (Recall@1/5/10 need >= 10)", min=1,
                     resumable=True)
    decoder: str = opt("beam", "catalogue tasks (NextItem, FavGenre): 'beam' = constrained beam search of --beams "
                       "(userllm.decoding); 'exact' = the --beams most likely entries by best-first search "
                       "(userllm.best_first), which a beam misses on NextItem (README, issue 14)",
                       choices=DECODERS, resumable=True)
    prior_weight: float = opt(0.0, "catalogue tasks (NextItem, FavGenre): the beam search ranks each entry by "
                              "log p(entry | user) - W * log p(entry | no history) (userllm.decoding."
                              "ContrastiveStepper): W discounts what the LLM writes for anyone (0 = the plain "
                              "likelihood, 1 = pointwise mutual information; cross-attention User-LLM only)",
                              min=0.0, max=1.0, resumable=True)

    def check(self) -> None:
        if self.text_events > self.window:
            raise UserError(f"--text-events: {self.text_events} is more than the window ({self.window})")
        if self.distill_steps:
            if self.task != "nextitem" or self.baseline == "textprompt":
                raise UserError("--distill-steps: only for the User-LLM on --task nextitem (the teacher is the "
                                "user encoder's next-item head)")
        if self.prior_weight and (self.baseline == "textprompt" or self.integration != "xattn"
                                  or self.task == "reviewg"):
            raise UserError("--prior-weight: only for the cross-attention User-LLM on a catalogue task (nextitem, "
                            "favgenre): 'no history' is its user context emptied")
        if self.decoder == "exact" and (self.task == "reviewg" or self.prior_weight):
            raise UserError("--decoder exact: only for the catalogue tasks (nextitem, favgenre) with --prior-weight 0 "
                            "(a contrastive score can rise along a title, so best-first search is not exact there)")
        if self.freeze_encoder and (self.baseline == "textprompt" or self.strategy not in ("full", "lora")):
            raise UserError(f"--freeze-encoder: only for the User-LLM with --strategy full or lora (got "
                            f"{'the TextPrompt baseline' if self.baseline == 'textprompt' else self.strategy})")
        if self.readout_title_tokens and not self.readout_tokens:
            raise UserError("--readout-title-tokens: needs --readout-tokens K > 0")
        if self.readout_pointer and (not self.readout_title_tokens or self.integration != "xattn"):
            raise UserError("--readout-pointer: needs --readout-title-tokens P > 0 (tokens to point at) and "
                            "--integration xattn")
        if not self.caption_steps:
            for flag, value in (("--caption-temperature", self.caption_temperature),
                                ("--caption-temperature-end", self.caption_temperature_end)):
                if value is not None:
                    raise UserError(f"{flag}: only with --caption-steps N > 0")
        if self.caption_steps:
            if self.task != "nextitem" or self.baseline == "textprompt" or not self.readout_tokens:
                raise UserError("--caption-steps: only for the User-LLM on --task nextitem with --readout-tokens "
                                "(it teaches the LLM to write a readout token's title)")
            if self.caption_replace > self.readout_tokens:
                raise UserError(f"--caption-replace: {self.caption_replace} is more than the --readout-tokens "
                                f"({self.readout_tokens})")
        if self.caption_steps + self.distill_steps > self.steps:
            flag = "--distill-steps" if self.distill_steps else "--caption-steps"
            raise UserError(f"{flag}: {self.caption_steps} caption + {self.distill_steps} distillation "
                            f"steps are more than --steps ({self.steps})")
        if self.baseline == "textprompt" and self.strategy not in ("full", "lora"):
            raise UserError(f"--strategy: the TextPrompt baseline trains the LLM with full or lora, not "
                            f"{self.strategy!r}")
        if self.llm_hidden % (32 if self.llm_hidden < 512 else 64):
            raise UserError(f"--llm-hidden: must be a multiple of 32 (of 64 from 512), got {self.llm_hidden}")
        if self.dataset != "synthetic" and self.data_path is None:
            raise UserError(f"--data-path: required for --dataset {self.dataset}")
        if self.checkpoint is not None and not self.resume:
            raise UserError("--checkpoint: only with --resume (the checkpoint of the run to continue)")
        if self.distributed == "fsdp":
            for flag, on in (("--compile", self.compile), ("--profile", self.profile)):
                if on:
                    raise UserError(f"--distributed fsdp: {flag} is not supported with FSDP (use --distributed ddp)")

    @property
    def model_name(self) -> str:
        """Short label of the model, e.g. ``UserLLM-xattn-enc`` or ``TextPrompt-full``."""
        if self.baseline == "textprompt":
            return f"TextPrompt-{self.strategy}"
        name = f"UserLLM-{self.integration}-{self.strategy}"
        if self.perceiver_latents:
            name += f"-perceiver{self.perceiver_latents}"
        if self.text_events:
            name += f"-TP{self.text_events}"
        if self.readout_tokens:
            name += f"-readout{self.readout_tokens}"
            if self.readout_title_tokens:
                name += f"x{self.readout_title_tokens}"
            if self.readout_pointer:
                name += "-pointer"
        if self.caption_steps:
            name += f"-caption{self.caption_steps}"
        if self.distill_steps:
            name += f"-distill{self.distill_steps}"
        return name

    @property
    def caption_temperatures(self) -> tuple[float, float]:
        """(first, last) temperature of the caption stage's label draw (:class:`userllm.distill.CaptionStage`)."""
        first = self.distill_temperature if self.caption_temperature is None else self.caption_temperature
        return first, first if self.caption_temperature_end is None else self.caption_temperature_end

    @property
    def text_prompt(self) -> bool:
        """The TextPrompt baseline (history as text, no user encoder)?"""
        return self.baseline == "textprompt"

    # ------------------------------------------------------------------ derived configs
    def user_llm_config(self):
        """The :class:`~userllm.integration.UserLLMConfig` of these options."""
        from .integration import UserLLMConfig

        return UserLLMConfig(integration=self.integration, xattn_every=self.xattn_every,
                             perceiver_latents=self.perceiver_latents, perceiver_layers=self.perceiver_layers,
                             task_prompt_len=self.soft_prompt_tokens, gate_init=self.gate_init,
                             readout_tokens=self.readout_tokens, readout_title_tokens=self.readout_title_tokens,
                             readout_pointer=self.readout_pointer)

    def pretrain_config(self, out: str | Path | None = None) -> "PretrainConfig":
        """The brief encoder pretraining of ``--pretrain-steps`` (``python -m userllm.pretrain``'s recipe and
        defaults at this run's data, encoder, window, width, depth and seed)."""
        return PretrainConfig(dataset=self.dataset, data_path=self.data_path if self.dataset != "synthetic" else None,
                              cache_dir=self.cache_dir, synthetic_users=self.synthetic_users,
                              synthetic_items=self.synthetic_items, synthetic_events=self.synthetic_events,
                              min_user_events=self.min_user_events, encoder=self.encoder, window=self.window,
                              steps=self.pretrain_steps, d_model=self.encoder_dim, layers=self.encoder_layers,
                              warmup=min(50, self.pretrain_steps // 10), seed=self.seed,
                              out=str(out) if out is not None else PretrainConfig.out)

    def encoder_spec(self, ds) -> dict[str, Any]:
        """``build_encoder`` config of a randomly initialised encoder (``--pretrain-steps 0``)."""
        return dict(feature_specs=list(ds.feature_specs), d_model=self.encoder_dim, n_layers=self.encoder_layers,
                    n_heads=2, dropout=0.1, max_len=self.window + 1)


def shared(name: str) -> Any:
    """The field ``name`` of :class:`TrainConfig` (default, help, choices, bounds) for another command's options
    dataclass (``python -m userllm.explore``, ``.journeys``), so that an option both take means the same in both."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    md = f.metadata
    return opt(f.default, md["help"], choices=md.get("choices"), min=md.get("min"), max=md.get("max"))


@dataclass
class PretrainConfig(DataOptions):
    """Options of ``python -m userllm.pretrain``: user-encoder pretraining on next-event prediction."""

    PROG: ClassVar[str] = "python -m userllm.pretrain"

    encoder: str = opt("ar", "ar (autoregressive) | dual (two-tower) | sasrec (the SASRec peer, item ids only)",
                       choices=ENCODERS)
    window: int = opt(50, "events of history per example (the encoder's max_len is window + 1)", min=1)
    stride: int = opt(0, "rows between training windows; 0 = window (ar, sasrec, dual --dual-targets all) / 1 "
                      "(dual)", min=0)
    steps: int = opt(0, "optimizer steps; 0 = --epochs passes over the training windows; may be changed on "
                     "--resume (the schedule is always the one of the final length)", min=0, resumable=True)
    epochs: float = opt(0.0, "training length in passes over the windows when --steps is 0; 0 = 40 (ar) / 2 "
                        "(dual; 40 with --dual-targets all) / 200 (sasrec, the reference code's length; use "
                        "--patience)", min=0.0, resumable=True)
    batch_size: int = opt(64, "windows per step", min=1)
    train_fraction: float = opt(1.0, "train on this fraction of the training windows (a fixed random sample "
                                "drawn with --seed; validation and test users unchanged): a learning curve "
                                "over data size", min=0.0, max=1.0)
    lr: float = opt(0.0, "peak learning rate (AdamW); 0 = 3e-3 (ar) / 1e-3 (dual, sasrec)", min=0.0)
    warmup: int = opt(50, "linear warmup steps before the cosine decay", min=0)
    min_lr_ratio: float = opt(0.05, "final learning rate as a fraction of --lr", min=0.0, max=1.0)
    weight_decay: float = opt(0.05, "AdamW weight decay of the weight matrices (not tables, biases, norms)",
                              min=0.0)
    grad_clip: float = opt(1.0, "gradient-norm clip; 0 = off", min=0.0)
    d_model: int = opt(64, "Transformer width", min=1)
    layers: int = opt(2, "Transformer layers", min=1)
    heads: int = opt(2, "attention heads", min=1)
    dropout: float = opt(0.2, "dropout probability, in [0, 1)", min=0.0)
    item_dim: int = opt(0, "item embedding width; 0 = by vocabulary size", min=0)
    rating_weight: float = opt(1.0, "ar: loss weight of the rating head (item weight is 1)", min=0.0)
    category_weight: float = opt(1.0, "ar: loss weight of the category head", min=0.0)
    user_embeddings: int = opt(1, "dual: k user embeddings", min=1)
    fusion: str = opt("last", "dual: last (last k events) | attention (k learned queries; learns poorly at the "
                      "defaults)", choices=("attention", "last"))
    negatives: str = opt("in_batch", "dual: in_batch | sampled (uniform) | mixed (in-batch + uniform) | all "
                         "(exact softmax over every item)", choices=("in_batch", "sampled", "mixed", "all"))
    dual_targets: str = opt("last", "dual: last (one label per window, stride 1) | all (every event of a window "
                            "is a label for its prefix, stride = window; needs --fusion last, --user-embeddings 1)",
                            choices=("last", "all"))
    num_negatives: int = opt(256, "dual, sampled / mixed: uniform negatives per step", min=1)
    temperature: float = opt(0.07, "dual: softmax temperature of the cosine scores (> 0)")
    dual_score: str = opt("cosine", "dual: cosine (over --temperature) | dot (the AR head's dot product)",
                          choices=("cosine", "dot"))
    label_tower: str = opt("mlp", "dual: the label tower over the item table, mlp (2 layers) | linear (one "
                           "layer) | table (the item's input embedding itself; needs --item-dim 0 or --d-model: "
                           "with --dual-score dot, the AR encoder's tied head)", choices=("mlp", "linear", "table"))
    logq_correction: bool = opt(True, "dual, in_batch / mixed: correct in-batch negatives' popularity bias "
                                "(log p(item), or log of the expected count with mixed, subtracted)")
    item_bias: bool = opt(False, "dual: a learned per-item bias added to the cosine scores (the popularity prior "
                          "the AR encoder's softmax head has)")
    sasrec_loss: str = opt("bce", "sasrec: bce (the paper's: one sampled negative per position) | ce (full "
                           "softmax, RecBole's default)", choices=("bce", "ce"))
    seed: int = opt(0, "seed of the initialization and the data order")
    out: str = opt("runs/pretrain", "run directory", resumable=True)
    resume: bool = opt(False, "continue the run in --out from its latest checkpoint", resumable=True)
    checkpoint: str | None = opt(None, "with --resume: the checkpoint to continue from (default: the newest "
                                 "in the run's checkpoints/), e.g. the last good one when the newest is damaged",
                                 resumable=True)
    filter_seen: bool = opt(False, "evaluation: drop items already in the user's history from the candidates",
                            resumable=True)
    eval_every: int = opt(0, "report validation metrics every N steps; 0 = at the end only", min=0,
                          resumable=True)
    patience: int = opt(0, "early stopping: stop after N validations (--eval-every) without a better validation "
                        "Recall@10 and keep the best one's weights; 0 = off", min=0)
    max_eval_users: int = opt(0, "evaluate a fixed random subset of users; 0 = all", min=0, resumable=True)
    checkpoint_every: int = opt(200, "steps between checkpoints", min=1, resumable=True)
    keep_checkpoints: int = opt(3, "checkpoints kept (newest); 0 = all", min=0, resumable=True)
    log_every: int = opt(20, "steps between metrics.jsonl records", min=1, resumable=True)
    device: str = opt("auto", "auto | cpu | cuda | cuda:N", resumable=True)
    # 1 because these small models gain little from more threads and lose much on shared cores
    threads: int = opt(1, "torch intra-op CPU threads; 0 = torch's default", min=0, resumable=True)

    def check(self) -> None:
        if not self.dropout < 1.0:
            raise UserError(f"--dropout: must lie in [0, 1), got {self.dropout}")
        if not self.train_fraction > 0:
            raise UserError(f"--train-fraction: must lie in (0, 1], got {self.train_fraction}")
        if self.temperature <= 0:
            raise UserError(f"--temperature: must be > 0, got {self.temperature}")
        if self.d_model % self.heads:
            raise UserError(f"--d-model: {self.d_model} must be divisible by --heads ({self.heads})")
        if self.dataset == "synthetic" and self.data_path is not None:
            raise UserError("--data-path: the synthetic dataset takes none")
        if self.encoder == "dual" and self.dual_targets == "all" and (self.fusion, self.user_embeddings) != ("last", 1):
            raise UserError("--dual-targets all: needs --fusion last and --user-embeddings 1")
        if self.patience and not self.eval_every:
            raise UserError("--patience: needs --eval-every N (the validations it counts)")
        if self.patience and self.resume:
            raise UserError("--patience: not with --resume (the best validation's weights are kept in memory only)")
        if self.checkpoint is not None and not self.resume:
            raise UserError("--checkpoint: only with --resume (the checkpoint of the run to continue)")
        if self.dataset != "synthetic" and self.data_path is None:
            raise UserError(f"--data-path: required for --dataset {self.dataset}")

    @property
    def effective_lr(self) -> float:
        # Measured on the synthetic default (540 steps): the dual encoder at 3e-3 ends below popularity
        # (Recall@10 0.017 vs 0.047); at 1e-3 it reaches 0.137.
        # SASRec: the paper's 1e-3.
        return self.lr or (3e-3 if self.encoder == "ar" else 1e-3)

    @property
    def effective_stride(self) -> int:
        return self.stride or (1 if self.encoder == "dual" and self.dual_targets == "last" else self.window)

    def total_steps(self, num_windows: int) -> int:
        """--steps, or --epochs passes over ``num_windows`` training windows."""
        epochs = self.epochs or {"ar": 40.0, "dual": 2.0 if self.dual_targets == "last" else 40.0,
                                 "sasrec": 200.0}[self.encoder]
        return self.steps or max(1, math.ceil(epochs * math.ceil(num_windows / self.batch_size)))

    def encoder_spec(self, ds) -> dict[str, Any]:
        """``build_encoder`` config of the encoder this stage trains on ``ds``."""
        dims = {"item": self.item_dim} if self.item_dim else None
        out: dict[str, Any] = dict(feature_specs=[dict(name=s.name, num_embeddings=s.num_embeddings,
                                                       multi_valued=s.multi_valued) for s in ds.feature_specs],
                                   feature_dims=dims, d_model=self.d_model, n_layers=self.layers,
                                   n_heads=self.heads, dropout=self.dropout, max_len=self.window + 1)
        names = [s.name for s in ds.feature_specs]
        if self.encoder == "ar":
            weights = {"rating": self.rating_weight, "category": self.category_weight}
            out["loss_weights"] = {k: v for k, v in weights.items() if k in names}
        elif self.encoder == "sasrec":
            out.update(loss=self.sasrec_loss, item_feature="item")
        else:
            out.update(num_user_embeddings=self.user_embeddings, fusion=self.fusion, negatives=self.negatives,
                       num_negatives=self.num_negatives, temperature=self.temperature, label_feature="item",
                       logq_correction=self.logq_correction, targets=self.dual_targets,
                       item_bias=self.item_bias, score=self.dual_score, label_tower=self.label_tower)
        return out


# ---------------------------------------------------------------------------------------------- parsing
def check_fields(config: Any) -> None:
    """Coerce every field of an :func:`opt`-built dataclass instance to its annotation and check its choices
    and bounds; :class:`UserError` naming the flag otherwise (also used by option dataclasses that are not
    :class:`Options`, e.g. ``python -m userllm.explore``'s)."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        setattr(config, f.name, _coerce(f.name, getattr(config, f.name), hints[f.name]))
        value, md = getattr(config, f.name), f.metadata
        if value is None:
            continue
        if md.get("choices") and value not in md["choices"]:
            raise UserError(f"{_flag(f.name)}: {value!r} is not one of {', '.join(map(str, md['choices']))}")
        if md.get("min") is not None and value < md["min"]:
            raise UserError(f"{_flag(f.name)}: must be >= {md['min']}, got {value}")
        if md.get("max") is not None and value > md["max"]:
            raise UserError(f"{_flag(f.name)}: must be <= {md['max']}, got {value}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _suggest(key: str, names: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key.replace("-", "_"), sorted(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _base_type(tp: Any) -> tuple[type, bool]:
    """(underlying type, optional?) of an annotation such as ``int`` or ``str | None``."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return tp, False


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check/convert one value from a file or the CLI; UserError naming the key when it does not fit."""
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{_flag(name)}: must not be null")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{_flag(name)}: expected true/false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise UserError(f"{_flag(name)}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise UserError(f"{_flag(name)}: expected an integer, got {value!r}")
    if base is float:
        if isinstance(value, bool):
            raise UserError(f"{_flag(name)}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{_flag(name)}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise UserError(f"{_flag(name)}: expected a finite number, got {value!r}")
        return out
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{_flag(name)}: expected a string, got {value!r}")
    raise TypeError(f"{name}: unsupported annotation {tp!r}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Keys of a YAML (.yaml/.yml) or JSON file; dashes in keys are accepted (``data-path``)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {p}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise UserError(f"--config {p}: cannot parse ({type(exc).__name__}: {exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"--config {p}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def help_with_default(help_text: str, default: Any, is_bool: bool = False) -> str:
    """``help`` with its default said once: ``(default: X)`` is appended unless the text already names the
    default; booleans say ``on`` / ``off``; a None default without explanation adds nothing."""
    if "(default" in help_text:
        return help_text
    if is_bool:
        return f"{help_text} (default: {'on' if default else 'off'})"
    if default is None or default == [] or default == "":
        return help_text
    return f"{help_text} (default: {default})"


def build_parser(cls: type = TrainConfig, prog: str | None = None,
                 description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one option per dataclass field; unset options are absent (SUPPRESS)."""
    parser = argparse.ArgumentParser(prog=prog or cls.PROG, description=description or cls.__doc__,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (the command line "
                                                         "overrides it)")
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        base, _ = _base_type(hints[f.name])
        md = f.metadata
        default = f.default if f.default is not MISSING else None
        kwargs: dict[str, Any] = {"help": help_with_default(md.get("help", ""), default, base is bool),
                                  "dest": f.name}
        if base is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        # Values are parsed as strings and checked by the config class so errors name the key the same
        # way for the command line and for files.
        kwargs["metavar"] = f.name.upper() if not md.get("choices") else "{" + ",".join(map(str, md["choices"])) + "}"
        parser.add_argument(_flag(f.name), type=str, **kwargs)
    return parser


def parse_config(argv: Sequence[str] | None = None, cls: type = TrainConfig, **parser_kwargs):
    """defaults < --config FILE < command line. argparse's own errors (unknown flag) become UserError."""
    parser = build_parser(cls, **parser_kwargs)
    parser.exit_on_error = False
    try:
        ns, extra = parser.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise UserError(str(exc)) from None
    if extra:
        names = {f.name for f in fields(cls)}
        bad = extra[0]
        raise UserError(f"unknown option {bad!r}" + _suggest(bad.lstrip("-").split("=")[0], names))
    given = vars(ns)
    values: dict[str, Any] = {}
    cfg_file = given.pop("config", None)
    if cfg_file:
        values.update(read_config_file(cfg_file))
        names = {f.name for f in fields(cls)}
        for key in values:
            if key not in names:
                raise UserError(f"--config {cfg_file}: unknown key {key!r}" + _suggest(key, names))
    values.update(given)
    return cls.from_dict(values, source="options")
