"""``TrainConfig``: every option of ``python -m userllm.train``, from the command line and/or a file.

The argparse parser is generated from the dataclass fields (name ``foo_bar`` -> ``--foo-bar``; help text,
choices and bounds come from the field metadata), so the CLI, the config files and ``config.json`` of a
run are always the same set of keys. Precedence: field defaults < ``--config FILE`` (YAML or JSON) <
explicit command-line options. Unknown keys and bad values raise :class:`~userllm.errors.UserError`
naming the key.
"""

from __future__ import annotations

import argparse
import json
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError

DATASETS = ("synthetic", "movielens", "amazon", "google_local")
TASKS = ("nextitem", "favgenre", "reviewg")
ENCODERS = ("ar", "dual")
INTEGRATIONS = ("xattn", "softprompt")
STRATEGIES = ("full", "lora", "enc", "proj")
BASELINES = ("none", "textprompt")


def opt(default: Any, help: str, *, choices: Sequence[Any] | None = None, min: float | None = None,
        max: float | None = None) -> Any:
    """A dataclass field with CLI metadata."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": min, "max": max})


@dataclass
class TrainConfig:
    """Options of ``python -m userllm.train`` (defaults: a ~5 minute CPU run on the synthetic data)."""

    # data
    dataset: str = opt("synthetic", "dataset reader", choices=DATASETS)
    data_path: str | None = opt(None, "path of the raw dataset (not needed for synthetic)")
    cache_dir: str | None = opt(None, "processed-data cache directory (default: the data loader's)")
    synthetic_users: int = opt(300, "synthetic data: users", min=1)
    synthetic_items: int = opt(400, "synthetic data: items", min=2)
    synthetic_events: int = opt(60, "synthetic data: mean events per user (uniform in [2/3, 4/3] of it)", min=6)
    min_user_events: int = opt(5, "drop users with fewer events (leave-last-out needs >= 3)", min=3)
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
    xattn_gate_init: float | None = opt(None, "initial value of the cross-attention tanh gates (None: 0, "
                                        "Flamingo-style, with --llm; 0.1 for the embedded random LLM, whose "
                                        "closed gates would barely open in a short run)")
    perceiver_latents: int = opt(0, "Perceiver resampler latents (0 = no resampler)", min=0)
    perceiver_layers: int = opt(1, "Perceiver resampler layers", min=1)
    readout_tokens: int = opt(0, "also give the LLM the encoder's K best next-item candidates as user tokens "
                              "(0 = the paper's per-event tokens only; userllm.integration.readout)", min=0)
    soft_prompt_tokens: int = opt(4, "learned task-prompt tokens (soft-prompt integration)", min=0)
    strategy: str = opt("full", "trainable parts: full (everything), lora (LoRA on the LLM + encoder + "
                        "projections), enc (encoder + integration), proj (integration only); with the embedded "
                        "default LLM the frozen-LLM strategies need --llm-pretrain-steps > 0",
                        choices=STRATEGIES)
    lora_rank: int = opt(8, "LoRA rank (strategy lora)", min=1)
    baseline: str = opt("none", "textprompt = the TextPrompt baseline: history as text, no user encoder",
                        choices=BASELINES)
    text_events: int = opt(0, "also render the last n window events as text (User-LLM mixed context, "
                           "e.g. AR50TP10 = --window 50 --text-events 10)", min=0)
    # LLM
    llm: str | None = opt(None, "local Hugging Face causal-LM directory (default: embedded tiny Llama)")
    llm_hidden: int = opt(128, "embedded default LLM: width (heads of 32 dims below 512, of 64 from 512; "
                          "half as many KV heads)",
                          min=32)
    llm_layers: int = opt(2, "embedded default LLM: decoder layers", min=1)
    tokenizer_vocab: int = opt(2048, "embedded default LLM: BPE vocabulary size", min=300)
    llm_pretrain_steps: int = opt(300, "embedded default LLM: causal-LM pretraining steps on the dataset's own "
                                  "text (titles, categories, reviews, prompt templates) before User-LLM training, "
                                  "cached beside the tokenizer; makes the frozen-LLM strategies (enc/proj/lora) "
                                  "usable (0 = random LLM)", min=0)
    max_target_tokens: int = opt(32, "maximum target tokens (review generation)", min=1)
    # optimisation
    steps: int = opt(1000, "training steps", min=1)
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
    device: str = opt("auto", "device: auto, cpu, cuda, cuda:N")
    threads: int = opt(0, "torch CPU threads; 0 = automatic: 1 for the embedded tiny LLM on CPU (its "
                       "matmuls are too small to gain from threads, and lose several-fold on a busy machine), "
                       "torch's default otherwise", min=0)
    # run
    out: str | None = opt(None, "run directory (default: runs/<dataset>-<task>-<model>-<time>)")
    resume: bool = opt(False, "continue the run in --out from its latest checkpoint")
    checkpoint_every: int = opt(250, "save a checkpoint every n steps (and at the end)", min=1)
    log_every: int = opt(20, "log training metrics every n steps", min=1)
    fused_kernels: bool = opt(False, "route embedding_concat / latent / cached cross-attention through "
                              "the fused kernels (triton on CUDA, native on CPU) when available")
    profile: bool = opt(False, "write profile.json (step times, tokens/s, peak memory)")
    # evaluation
    eval_users: int = opt(200, "evaluate on at most this many test users (0 = all)", min=0)
    eval_batch_size: int = opt(32, "evaluation batch size", min=1)
    beams: int = opt(10, "beam width of the constrained decoder (Recall@1/5/10 need >= 10)", min=1)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            setattr(self, f.name, _coerce(f.name, value, hints[f.name]))
            value = getattr(self, f.name)
            md = f.metadata
            if value is None:
                continue
            if md.get("choices") and value not in md["choices"]:
                raise UserError(f"{_flag(f.name)}: {value!r} is not one of {', '.join(map(str, md['choices']))}")
            if md.get("min") is not None and value < md["min"]:
                raise UserError(f"{_flag(f.name)}: must be >= {md['min']}, got {value}")
            if md.get("max") is not None and value > md["max"]:
                raise UserError(f"{_flag(f.name)}: must be <= {md['max']}, got {value}")
        if self.text_events > self.window:
            raise UserError(f"--text-events: {self.text_events} is more than the window ({self.window})")
        if self.baseline == "textprompt" and self.strategy not in ("full", "lora"):
            raise UserError(f"--strategy: the TextPrompt baseline trains the LLM with full or lora, not "
                            f"{self.strategy!r}")
        if self.llm_hidden % (32 if self.llm_hidden < 512 else 64):
            raise UserError(f"--llm-hidden: must be a multiple of 32 (of 64 from 512), got {self.llm_hidden}")
        if self.dataset != "synthetic" and self.data_path is None:
            raise UserError(f"--data-path: required for --dataset {self.dataset}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        for key in d:
            if key not in names:
                raise UserError(f"{source}: unknown key {key!r}" + _suggest(key, names))
        return cls(**d)

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
        return name


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
    raise TypeError(f"TrainConfig.{name}: unsupported annotation {tp!r}")


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


def build_parser(cls: type = TrainConfig, prog: str = "python -m userllm.train",
                 description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one option per dataclass field; unset options are absent (SUPPRESS)."""
    parser = argparse.ArgumentParser(prog=prog, description=description or cls.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (the command line "
                                                         "overrides it)")
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        base, _ = _base_type(hints[f.name])
        md = f.metadata
        help_text = md.get("help", "")
        default = f.default if f.default is not MISSING else None
        help_text += f" (default: {default})" if base is not bool else ""
        kwargs: dict[str, Any] = {"help": help_text, "dest": f.name}
        if base is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                                **kwargs, default=argparse.SUPPRESS)
            continue
        # Values are parsed as strings and checked by TrainConfig so errors name the key the same way
        # for the command line and for files.
        kwargs["metavar"] = f.name.upper() if not md.get("choices") else "{" + ",".join(map(str, md["choices"])) + "}"
        parser.add_argument(_flag(f.name), type=str, **kwargs)
    return parser


def parse_config(argv: Sequence[str] | None = None, cls: type = TrainConfig, **parser_kwargs) -> TrainConfig:
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
