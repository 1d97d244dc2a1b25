"""``JourneysConfig``: every option of ``python -m userllm.journeys``.

The CLI, ``--config FILE`` and the run's ``config.json`` come from :mod:`userllm.config`'s machinery
(:func:`~userllm.config.parse_config` with ``cls=JourneysConfig``): the same flags, precedence and
one-line errors as ``python -m userllm.train``. Data, encoder and LLM options keep ``TrainConfig``'s names
and meanings, so userllm.factory's builders (data loading, the brief encoder pretraining, the embedded LLM)
take it through :meth:`JourneysConfig.train_config`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..config import ENCODERS, INTEGRATIONS, TrainConfig, check_fields, opt, shared
from ..errors import UserError

CLUSTERINGS = ("agglomerative", "online")
LINKAGES = ("average", "complete", "single")
METHODS = ("all", "fewshot", "prompt", "finetune", "none")
FINETUNES = ("lora", "full")
SECONDS_PER_DAY = 86400


@dataclass
class JourneysConfig:
    """Options of ``python -m userllm.journeys`` (defaults: the synthetic data, a few CPU minutes)."""

    # data
    dataset: str = shared("dataset")
    data_path: str | None = shared("data_path")
    cache_dir: str | None = shared("cache_dir")
    synthetic_users: int = opt(200, "synthetic data: users", min=1)
    synthetic_items: int = opt(300, "synthetic data: items", min=2)
    synthetic_events: int = shared("synthetic_events")
    min_user_events: int = shared("min_user_events")
    # user encoder (its item embeddings drive the clustering; it also feeds the User-LLM namers)
    encoder: str = opt("ar", "user encoder kind when one is pretrained here", choices=ENCODERS)
    encoder_checkpoint: str | None = opt(None, "pretrained encoder (python -m userllm.pretrain's "
                                         "encoder.safetensors); default: pretrain one briefly")
    pretrain_steps: int = opt(150, "encoder pretraining steps when no --encoder-checkpoint is given (0 = none: "
                              "then --encoder-checkpoint is required)", min=0)
    encoder_dim: int = shared("encoder_dim")
    encoder_layers: int = shared("encoder_layers")
    window: int = opt(50, "at most this many events of a journey (its most recent) enter the encoder", min=1)
    # extraction
    clustering: str = opt("agglomerative", "per-user clustering: scikit-learn agglomerative with a distance "
                          "threshold, or online (a new journey when no centroid is close)", choices=CLUSTERINGS)
    distance_threshold: float = opt(0.6, "cosine distance above which events do not share a journey "
                                    "(agglomerative: the linkage threshold; online: distance to the centroid)",
                                    min=0.0, max=2.0)
    linkage: str = opt("average", "agglomerative linkage", choices=LINKAGES)
    genre_weight: float = opt(0.5, "weight of the categories/genres in the event similarity (cosine = "
                              "(1 - w) cos(item embeddings) + w cos(genre vectors)); 0 = embeddings only",
                              min=0.0, max=1.0)
    min_events: int = opt(5, "m: a persistent journey has at least this many events", min=1)
    min_days: float = opt(14.0, "t: ... spanning at least this many days", min=0.0)
    max_journeys: int = opt(0, "keep at most this many journeys per user (0 = all)", min=0)
    # references and naming
    name_labels: int = opt(3, "labels (tags or genres) in a reference name", min=1)
    method: str = opt("all", "naming method(s): few-shot prompting, prompt-tuning, fine-tuning, all three, "
                      "or none (extraction and the baseline only)", choices=METHODS)
    test_fraction: float = opt(0.3, "share of users held out for testing the names", min=0.0, max=1.0)
    shots: int = opt(3, "few-shot: example journeys in the prompt (the nearest training journeys)", min=0)
    prompt_titles: int = opt(5, "few-shot: titles listed per journey (its most recent)", min=1)
    integration: str = opt("softprompt", "prompt-/fine-tuning: how the journey's events enter the LLM",
                           choices=INTEGRATIONS)
    soft_prompt_tokens: int = opt(8, "learned task-prompt tokens (soft-prompt integration)", min=0)
    finetune: str = opt("lora", "fine-tuning: the whole LLM or LoRA adapters", choices=FINETUNES)
    lora_rank: int = shared("lora_rank")
    steps: int = opt(300, "training steps of each trained namer", min=1)
    batch_size: int = opt(32, "training batch size (journeys)", min=1)
    lr: float = shared("lr")
    warmup: int = shared("warmup")
    grad_clip: float = shared("grad_clip")
    max_name_tokens: int = opt(16, "at most this many generated tokens per name", min=1)
    # LLM (TrainConfig's names)
    llm: str | None = shared("llm")
    llm_hidden: int = shared("llm_hidden")
    llm_layers: int = shared("llm_layers")
    tokenizer_vocab: int = shared("tokenizer_vocab")
    llm_pretrain_steps: int = opt(300, "embedded default LLM: causal-LM pretraining steps on the dataset's "
                                  "text plus the training journeys' reference names (cached)", min=0)
    # run
    seed: int = opt(0, "random seed (user split, training order, initialisation)")
    device: str = shared("device")
    threads: int = opt(1, "torch CPU threads (0 = torch's default)", min=0)
    out: str | None = opt(None, "run directory (default: runs/journeys-<dataset>-<time>)")
    plot_users: int = opt(4, "timeline PNGs for this many test users (a seeded sample of those with journeys)",
                          min=0)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_fields(self)
        if self.dataset != "synthetic" and self.data_path is None:
            raise UserError(f"--data-path: required for --dataset {self.dataset}")
        if self.llm_hidden % (32 if self.llm_hidden < 512 else 64):
            raise UserError(f"--llm-hidden: must be a multiple of 32 (of 64 from 512), got {self.llm_hidden}")
        if self.encoder_checkpoint is None and self.pretrain_steps == 0:
            raise UserError("no encoder checkpoint: give --encoder-checkpoint PATH (python -m userllm.pretrain "
                            "writes one) or --pretrain-steps > 0; journeys cluster the encoder's item embeddings")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config") -> "JourneysConfig":
        from ..config import _suggest

        names = {f.name for f in fields(cls)}
        for key in d:
            if key not in names:
                raise UserError(f"{source}: unknown key {key!r}" + _suggest(key, names))
        return cls(**d)

    def train_config(self) -> TrainConfig:
        """The :class:`TrainConfig` of the shared options, for :mod:`userllm.factory`'s builders (data, the
        encoder and its brief pretraining)."""
        keys = ("dataset", "data_path", "cache_dir", "synthetic_users", "synthetic_items", "synthetic_events",
                "min_user_events", "window", "encoder", "encoder_checkpoint", "pretrain_steps", "encoder_dim",
                "encoder_layers", "llm", "llm_hidden", "llm_layers", "tokenizer_vocab", "llm_pretrain_steps",
                "seed", "device", "threads")
        return TrainConfig(**{k: getattr(self, k) for k in keys})

    @property
    def methods(self) -> tuple[str, ...]:
        """The naming methods this run trains/evaluates, in table order."""
        if self.method == "all":
            return ("fewshot", "prompt", "finetune")
        return () if self.method == "none" else (self.method,)
