"""``ExploreConfig``: every option of ``python -m userllm.explore``.

The command line / ``--config FILE`` machinery is :func:`userllm.config.parse_config` (the parser is
generated from these dataclass fields, as for ``python -m userllm.train``); the shared options (data,
encoder, LLM) keep the names and meanings they have there, and :meth:`ExploreConfig.train_config` hands
them to the builders of :mod:`userllm.factory`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import STRATEGIES, DataOptions, TrainConfig, opt, shared
from ..errors import UserError
from .clusters import FEEDBACK_RULES
from .selection import SELECTIONS

ALIGNED_HEADS = ("answer", "user")

@dataclass
class ExploreConfig(DataOptions):
    """Options of ``python -m userllm.explore`` (defaults: the synthetic data, a few CPU minutes)."""

    PROG: ClassVar[str] = "python -m userllm.explore"

    # interest clusters, novel transitions, feedback
    clusters: int = opt(20, "K: interest clusters (KMeans over the encoder's item embeddings)", min=2)
    window: int = opt(10, "history window: an event is novel when its cluster is absent from the window's "
                      "events before it; also the events the LLMs see (as user embeddings)", min=1)
    prompt_clusters: int = opt(0, "recent clusters written in the prompts as text, most recent last "
                               "(0 = every distinct cluster of the window)", min=0)
    feedback: str = opt("either", "positive feedback on a novel transition: rating >= --rating-threshold, "
                        "engagement = the user returns to the cluster within --follow-up events, both, "
                        "or either", choices=FEEDBACK_RULES)
    rating_threshold: float = opt(4.0, "a novel event rated at least this (source scale) is rated well")
    follow_up: int = opt(5, "follow-up horizon: events after a novel event checked for engagement", min=1)
    test_fraction: float = opt(0.3, "held-out users (evaluated on their last novel transition)", min=0.01,
                               max=0.99)
    max_test_users: int = opt(0, "evaluate at most this many held-out users (0 = all)", min=0)
    # user encoder
    encoder: str = shared("encoder")
    encoder_checkpoint: str | None = opt(None, "pretrained encoder (default: pretrain one on the training "
                                         "users only; a checkpoint from userllm.pretrain has also seen "
                                         "the held-out users' earlier events)")
    pretrain_steps: int = opt(300, "encoder pretraining steps without --encoder-checkpoint", min=1)
    pretrain_window: int = opt(50, "encoder pretraining window (>= --window)", min=1)
    encoder_dim: int = shared("encoder_dim")
    encoder_layers: int = shared("encoder_layers")
    # LLMs (both: the novelty LLM and the user-aligned LLM start from the same one)
    llm: str | None = shared("llm")
    llm_hidden: int = shared("llm_hidden")
    llm_layers: int = shared("llm_layers")
    tokenizer_vocab: int = shared("tokenizer_vocab")
    llm_pretrain_steps: int = shared("llm_pretrain_steps")
    strategy: str = shared("strategy")
    lora_rank: int = shared("lora_rank")
    # training of the two LLMs
    novelty_steps: int = opt(300, "novelty LLM training steps", min=1)
    aligned_steps: int = opt(300, "user-aligned LLM training steps", min=1)
    aligned_negatives: int = opt(3, "aligned LLM: per observed novel transition, this many other new "
                                 "clusters the user did not go to, as 'no' examples", min=0)
    negative_sampling: str = opt("popularity", "how the aligned LLM's 'no' clusters are drawn: in proportion "
                                 "to their popularity as novel targets, or uniformly",
                                 choices=("popularity", "uniform"))
    aligned_lr: float = opt(0.0, "aligned LLM peak learning rate (0 = --lr)", min=0.0)
    aligned_strategy: str = opt("", "aligned LLM trainable parts, as --strategy (empty = --strategy)",
                                choices=("",) + STRATEGIES)
    # Default user: on ml-latest-small the answer alone learnt no within-user ranking (held-out AUC 0.52-0.58,
    # seed 0) and the head did (0.697 +- 0.030 over 3 seeds, and the target met; README "Exploration").
    aligned_head: str = opt("user", "aligned LLM score: answer = logit(yes) - logit(no) (the paper's), user = "
                            "that plus a small head on the user embedding (userllm/explore/models.py UserHead)",
                            choices=ALIGNED_HEADS)
    aligned_balance: bool = opt(False, "aligned LLM: weight yes and no so that each carries half the loss")
    aligned_eval_contexts: int = opt(256, "held-out contexts (of held-out users' novel transitions, with "
                                     "max(1, --aligned-negatives) negatives each) on which the aligned LLM's "
                                     "AUC is measured after training", min=1)
    batch_size: int = opt(16, "training batch size", min=1)
    lr: float = shared("lr")
    warmup: int = shared("warmup")
    grad_clip: float = shared("grad_clip")
    # inference and evaluation
    n_values: str = opt("1,2,4,8,16,32", "best-of-n sample counts, comma separated")
    temperature: float = opt(1.0, "novelty LLM sampling temperature (> 0)", min=1e-6)
    top_p: float = opt(1.0, "novelty LLM nucleus sampling mass", min=1e-6, max=1.0)
    selection: str = opt("top", "how best-of-n picks among its samples: the top aligned score (the paper's), "
                         "the top lift of the score over its per-cluster prior, or a draw from "
                         "softmax(score / --selection-temperature) (userllm/explore/selection.py)",
                         choices=SELECTIONS)
    selection_temperature: float = opt(1.0, "temperature of --selection softmax (> 0)", min=1e-6)
    eval_batch_size: int = opt(32, "users per evaluation batch", min=1)
    # run
    seed: int = opt(0, "random seed (the first one with --seeds)")
    seeds: int = opt(1, "run seeds seed .. seed + n - 1 and report their mean and standard deviation", min=1)
    device: str = shared("device")
    threads: int = opt(1, "torch CPU threads (0 = torch's default)", min=0)
    out: str | None = opt(None, "run directory (default: runs/explore-<dataset>-<time>)")

    def check(self) -> None:
        self.n_list  # noqa: B018 - parses and checks --n-values
        if self.pretrain_window < self.window:
            raise UserError(f"--pretrain-window: {self.pretrain_window} is less than --window {self.window}")
        if self.dataset != "synthetic" and self.data_path is None:
            raise UserError(f"--data-path: required for --dataset {self.dataset}")
        if self.llm_hidden % (32 if self.llm_hidden < 512 else 64):
            raise UserError(f"--llm-hidden: must be a multiple of 32 (of 64 from 512), got {self.llm_hidden}")

    @property
    def n_list(self) -> list[int]:
        """The sorted distinct values of ``--n-values``."""
        try:
            ns = sorted({int(x) for x in self.n_values.split(",") if x.strip()})
        except ValueError:
            raise UserError(f"--n-values: expected comma-separated integers, got {self.n_values!r}") from None
        if not ns or ns[0] < 1:
            raise UserError(f"--n-values: expected integers >= 1, got {self.n_values!r}")
        return ns

    def aligned_train_config(self, seed: int) -> TrainConfig:
        """:meth:`train_config` with ``--aligned-strategy`` (when given) as the strategy."""
        import dataclasses

        tcfg = self.train_config(seed)
        return dataclasses.replace(tcfg, strategy=self.aligned_strategy) if self.aligned_strategy else tcfg

    def train_config(self, seed: int) -> TrainConfig:
        """The :class:`TrainConfig` of the shared options, for :mod:`userllm.factory`'s builders
        (cross-attention integration; the task field is unused here)."""
        shared = ("dataset", "data_path", "cache_dir", "synthetic_users", "synthetic_items", "synthetic_events",
                  "min_user_events", "window", "encoder", "encoder_checkpoint", "encoder_dim", "encoder_layers",
                  "llm", "llm_hidden", "llm_layers", "tokenizer_vocab", "llm_pretrain_steps", "strategy",
                  "lora_rank", "batch_size", "lr", "warmup", "grad_clip", "device", "threads")
        return TrainConfig(**{k: getattr(self, k) for k in shared}, seed=seed, integration="xattn",
                           pretrain_steps=self.pretrain_steps)
