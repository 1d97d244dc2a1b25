"""Autoregressive user encoder (User-LLM section 3.1, early fusion).

Each event's features (item, rating, genres, ...) are looked up in per-feature tables, concatenated
(``userllm.kernels.embedding_concat``; multi-valued features mean-pooled, ids < 0 padding), projected
to ``d_model``, given learned positions and run through a causal pre-LN Transformer. Position ``t``
predicts every feature of event ``t + 1`` with a softmax head per feature whose output matrix is that
feature's embedding table (weight tying): ``logits_i = W_i h + b_i`` projected to width ``D_i``, then
``@ table_i^T``.

Loss (:meth:`AutoregressiveEncoder.next_event_loss`) = sum over features of ``weight_i * CE_i`` where
``CE_i`` is the mean cross-entropy over the valid targets of feature ``i``:
  * targets that are padding (< 0) or UNK (id 0) are ignored: "unknown" is not a thing to predict, and
    the ranking metrics exclude it too;
  * a multi-valued target (a bag of genres) uses the soft-target cross-entropy with the uniform
    distribution over its valid ids, which equals the average CE of its ids under one softmax;
    an event whose bag has no valid id is ignored for that feature;
  * a feature with no valid target in the batch contributes 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .transformer import (CausalTransformer, EncoderOutput, EventEmbedding, Feature, as_features,
                          init_linear_weights, length_mask)


@dataclass
class EncoderConfig:
    """Configuration of the user encoders (both kinds share these fields).

    feature_specs: FeatureSpec-like objects (``name``, ``num_embeddings``, ``multi_valued``) or dicts,
                   in the order of the feature tensors a batch carries; normalized to :class:`Feature`.
    feature_dims:  per-feature embedding widths (list in spec order or ``{name: dim}``); None = a width
                   growing with the vocabulary (``transformer.default_dim``).
    loss_weights:  ``{name: weight}`` for the next-event loss (default 1 for every feature; 0 drops one).
    """

    feature_specs: list = field(default_factory=list)
    feature_dims: Any = None
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.1
    max_len: int = 256
    loss_weights: dict | None = None

    def __post_init__(self) -> None:
        self.feature_specs = as_features(self.feature_specs, self.feature_dims)
        self.feature_dims = [f.dim for f in self.feature_specs]
        names = {f.name for f in self.feature_specs}
        unknown = set(self.loss_weights or {}) - names
        if unknown:
            raise ValueError(f"loss_weights names unknown features {sorted(unknown)}; features are {sorted(names)}")
        for name in ("d_model", "n_layers", "n_heads", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        """JSON-serializable form; ``type(self).from_dict(cfg.to_dict())`` rebuilds an equal config."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["feature_specs"] = [asdict(f) for f in self.feature_specs]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def valid_target_mask(target: torch.Tensor) -> torch.Tensor:
    """Targets worth predicting: not padding (< 0) and not UNK (0)."""
    return target > 0


def feature_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Mean CE of logits [N, V] against target [N] or bags [N, K]; None when no target is valid.

    Bags use the soft target uniform over their valid ids (= mean CE of those ids under one softmax).
    """
    logits = logits.float()
    if target.dim() == 1:
        valid = valid_target_mask(target)
        if not bool(valid.any()):
            return None
        return F.cross_entropy(logits[valid], target[valid])
    valid = valid_target_mask(target)                                   # [N, K]
    count = valid.sum(dim=1)
    rows = count > 0
    if not bool(rows.any()):
        return None
    logp = torch.log_softmax(logits[rows], dim=-1)                        # [N', V]
    picked = logp.gather(1, target[rows].clamp_min(0))                    # [N', K]
    picked = (picked * valid[rows]).sum(dim=1) / count[rows]
    return -picked.mean()


class AutoregressiveEncoder(nn.Module):
    """Early-fusion causal Transformer over event sequences with tied per-feature softmax heads.

    forward(features, lengths):
        features: list (spec order) of int64 [B, L] (single-valued) or [B, L, K] (multi-valued), -1 padded,
                  right padded; lengths: int64 [B] in [0, L].
        returns   EncoderOutput(embeddings float [B, L, d_model] (zeros at padding), mask bool [B, L]).
    """

    kind = "ar"

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.features: list[Feature] = list(config.feature_specs)
        d = config.d_model
        self.embed = EventEmbedding(self.features, d, config.max_len, config.dropout)
        self.transformer = CausalTransformer(d, config.n_layers, config.n_heads, config.dropout)
        # Head i: hidden -> width D_i, then dot with table_i (tied). The projection lets features of
        # different widths share one hidden state; the bias models each id's prior (popularity).
        self.head_proj = nn.ModuleDict({f.name: nn.Linear(d, f.dim) for f in self.features})
        self.head_bias = nn.ParameterDict({f.name: nn.Parameter(torch.zeros(f.num_embeddings))
                                           for f in self.features})
        init_linear_weights(self)

    @property
    def output_dim(self) -> int:
        return self.config.d_model

    @property
    def tables(self) -> nn.ParameterDict:
        """Per-feature embedding tables ``{name: [V_i, D_i]}`` (also the output matrices of the heads)."""
        return self.embed.tables

    def head_weight(self, name: str) -> nn.Parameter:
        """The output matrix of feature ``name``'s softmax head: the very Parameter of its embedding table."""
        return self.embed.tables[name]

    def feature_index(self, name: str) -> int:
        for i, f in enumerate(self.features):
            if f.name == name:
                return i
        raise KeyError(f"unknown feature {name!r}; features are {[f.name for f in self.features]}")

    def forward(self, features: Sequence[torch.Tensor], lengths: torch.Tensor) -> EncoderOutput:
        L = features[0].shape[1]
        lengths = lengths.to(features[0].device)
        mask = length_mask(lengths, L)
        # Causal attention + right padding: real positions never see padded ones (module docstring).
        h = self.transformer(self.embed(features))
        return EncoderOutput(h * mask.unsqueeze(-1).to(h.dtype), mask)

    def feature_logits(self, hidden: torch.Tensor, name: str) -> torch.Tensor:
        """hidden [..., d_model] -> logits [..., V_name] over feature ``name``'s vocabulary (tied head)."""
        table = self.head_weight(name)
        proj = self.head_proj[name](hidden)
        bias = self.head_bias[name].to(proj.dtype)
        if proj.dim() == 2:     # scoring [B, V]: the bias added inside the GEMM (one pass over [B, V] less)
            return torch.addmm(bias, proj, table.to(proj.dtype).t())
        return proj @ table.to(proj.dtype).t() + bias

    def next_event_loss(self, features: Sequence[torch.Tensor], lengths: torch.Tensor
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Position t predicts every feature of event t + 1 (see the module docstring for the rules).

        Returns (loss: scalar float32 tensor, per_feature: {name: detached scalar CE}); features whose
        targets are all ignored are absent from ``per_feature``.
        """
        out = self.forward(features, lengths)
        L = out.mask.shape[1]
        src = length_mask((out.mask.sum(1) - 1).clamp_min(0), L - 1) if L > 1 else out.mask[:, :0]
        hidden = out.embeddings[:, :-1][src]                                 # [N, d] only real sources
        weights = self.config.loss_weights or {}
        total = hidden.new_zeros((), dtype=torch.float32)
        per_feature: dict[str, torch.Tensor] = {}
        for f, ids in zip(self.features, features):
            w = float(weights.get(f.name, 1.0))
            if w == 0.0:
                continue
            target = ids[:, 1:][src]                                          # [N] or [N, K]
            ce = feature_cross_entropy(self.feature_logits(hidden, f.name), target)
            if ce is None:
                continue
            per_feature[f.name] = ce.detach()
            total = total + w * ce
        return total, per_feature

    @torch.no_grad()
    def score_next(self, features: Sequence[torch.Tensor], lengths: torch.Tensor, feature: str = "item"
                   ) -> torch.Tensor:
        """Scores float32 [B, V] of ``feature``'s ids for the event after each history (its last real event).

        Rows with ``lengths == 0`` use position 0's output (no history: a prior-only score).
        """
        return self.feature_logits(self.last_hidden(features, lengths), feature).float()

    @torch.no_grad()
    def next_item_query(self, features: Sequence[torch.Tensor], lengths: torch.Tensor, feature: str = "item"
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The factors of :meth:`score_next`: (query [B, D], table [V, D], bias [V]), all of the query's dtype,
        with ``score_next(features, lengths, feature) == torch.addmm(bias, query, table.t()).float()``.

        For a scorer that never materialises the [B, V] scores (:func:`userllm.ranking.rank_tiled`)."""
        query = self.head_proj[feature](self.last_hidden(features, lengths))
        return query, self.head_weight(feature).to(query.dtype), self.head_bias[feature].to(query.dtype)

    def last_hidden(self, features: Sequence[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        """float [B, d_model]: the output at each row's last real event (position 0 when ``lengths == 0``),
        equal bit for bit to ``forward(...).embeddings[b, lengths[b] - 1]`` without computing
        the last block at the other positions (:meth:`CausalTransformer.forward_last`)."""
        L = features[0].shape[1]
        last = (lengths.to(features[0].device).clamp(max=L) - 1).clamp_min(0)
        return self.transformer.forward_last(self.embed(features), last)
