"""Dual (two-tower) user encoder (User-LLM section 3.1).

User tower: the same early-fusion embedding and causal Transformer as the autoregressive encoder,
followed by fusion layers that turn the event sequence into ``k`` user embeddings:
  * ``fusion="attention"``: k learned queries attend over the real events
    (``userllm.kernels.latent_cross_attention``), then a residual MLP;
  * ``fusion="last"``: the outputs of the last k real events (a history shorter than k repeats its first
    event), each through an MLP.
Label tower: the label feature's embedding (the user tower's table, shared) -> MLP -> d_model
(``label_tower="mlp"``), one Linear layer (``"linear"``), or the embedding itself (``"table"``, when its
width is d_model: with ``score="dot"`` the user tower's output dotted with the item's input embedding,
the form of the AR encoder's tied head and of YouTube's two-tower softmax, Covington et al. 2016).

Score of user u and item i: ``max_j cos(u_j, v_i) / temperature`` (``score="cosine"``; multi-interest
max, k = 1 is the plain cosine) or ``max_j u_j . v_i`` (``score="dot"``, no temperature: the norms are
learned), plus a learned per-item bias ``b_i`` with ``item_bias`` (the popularity prior that the AR
encoder's softmax head has and a cosine cannot express: the cosine's range is the same for every item). Loss: softmax cross-entropy of the true next item against ``negatives="in_batch"``
(the other rows' labels; copies of the row's own label are masked out), ``negatives="sampled"``
(``num_negatives`` ids drawn uniformly from the vocabulary, shared by the batch, copies of the label
masked), ``negatives="mixed"`` (mixed negative sampling, Yang et al. WWW 2020: the in-batch labels plus
``num_negatives`` uniform ids shared by the batch) or ``negatives="all"`` (the exact softmax over every
real item: the label tower runs over the whole catalogue each step, [V, d], cheap next to the user tower
for a 10k-item catalogue). Labels that are padding or UNK are ignored.

In-batch negatives are drawn by popularity: an item that is a label in many windows is a negative in many
batches, so without correction the model learns to push popular items down. ``logq_correction``
(Yi et al., RecSys 2019) subtracts log p(item) from every in-batch logit, where p is the item's share of
the training labels, given once with :meth:`DualEncoder.set_label_frequencies` (the pretraining stage
passes the train-part item counts; until then the correction is zero). With ``"mixed"`` a candidate's
expected count in a step is ``B p(item) + n / (V - 1)`` (B in-batch draws by popularity, n uniform ones over
the V - 1 real ids), and its log is subtracted instead. ``"sampled"`` (uniform) and ``"all"`` need none.

Only the user tower is used downstream: ``forward`` returns [B, k, d_model] with an all-True mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from userllm import kernels

from .autoregressive import EncoderConfig
from .transformer import CausalTransformer, EncoderOutput, EventEmbedding, init_linear_weights, length_mask

FUSIONS = ("attention", "last")
NEGATIVES = ("in_batch", "sampled", "mixed", "all")
TARGETS = ("last", "all")
SCORES = ("cosine", "dot")
LABEL_TOWERS = ("mlp", "linear", "table")
IGNORE = -100         # cross-entropy target of a row without a real label


@dataclass
class DualEncoderConfig(EncoderConfig):
    """EncoderConfig plus: num_user_embeddings (k), fusion, negatives, num_negatives, temperature,
    label_feature (the feature the label tower embeds and the loss predicts), logq_correction (in-batch
    and mixed negatives only), targets ("last": one label per window, its last event; "all": every event
    of the window after the first, see :meth:`DualEncoder.next_event_loss`), item_bias (a learned bias
    per label id added to every score), score ("cosine" / "dot") and label_tower ("mlp" / "linear" /
    "table"), module docstring."""

    num_user_embeddings: int = 1
    fusion: str = "attention"
    negatives: str = "in_batch"
    num_negatives: int = 256
    temperature: float = 0.07
    label_feature: str = "item"
    logq_correction: bool = True
    targets: str = "last"
    item_bias: bool = False
    score: str = "cosine"
    label_tower: str = "mlp"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {NEGATIVES}, got {self.negatives!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.label_tower not in LABEL_TOWERS:
            raise ValueError(f"label_tower must be one of {LABEL_TOWERS}, got {self.label_tower!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"targets must be one of {TARGETS}, got {self.targets!r}")
        if self.targets == "all" and (self.fusion != "last" or self.num_user_embeddings != 1):
            raise ValueError("targets='all' needs fusion='last' and num_user_embeddings=1 (a prefix's user "
                             "embedding is then the output at its last event)")
        if self.num_user_embeddings < 1 or self.num_negatives < 1 or self.temperature <= 0:
            raise ValueError("num_user_embeddings and num_negatives must be >= 1 and temperature > 0")
        names = [f.name for f in self.feature_specs]
        if self.label_feature not in names:
            raise ValueError(f"label_feature {self.label_feature!r} is not a feature ({names})")
        label_dim = self.feature_specs[names.index(self.label_feature)].dim
        if self.label_tower == "table" and label_dim != self.d_model:
            raise ValueError(f"label_tower='table' needs the {self.label_feature} embedding width ({label_dim}) to "
                             f"equal d_model ({self.d_model})")


def _mlp(d_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.Linear(d, d))


class DualEncoder(nn.Module):
    """Two-tower encoder. forward(features, lengths) -> EncoderOutput([B, k, d_model], mask all True [B, k])."""

    kind = "dual"

    def __init__(self, config: DualEncoderConfig):
        super().__init__()
        self.config = config
        self.features = list(config.feature_specs)
        d, k, H = config.d_model, config.num_user_embeddings, config.n_heads
        self.embed = EventEmbedding(self.features, d, config.max_len, config.dropout)
        self.transformer = CausalTransformer(d, config.n_layers, config.n_heads, config.dropout)
        if config.fusion == "attention":
            self.queries = nn.Parameter(torch.randn(k, H, d // H) * 0.02)
            self.kv = nn.Linear(d, 2 * d)
            self.fuse_out = nn.Linear(d, d)
            self.fuse_ln = nn.LayerNorm(d)
        self.fuse_mlp = _mlp(d, d)
        label_dim = self.features[self.label_index].dim
        # named label_mlp for every tower, so that strategies and checkpoints find it under one name
        self.label_mlp = {"mlp": lambda: _mlp(label_dim, d), "linear": lambda: nn.Linear(label_dim, d),
                          "table": nn.Identity}[config.label_tower]()
        V = self.features[self.label_index].num_embeddings
        self.label_bias = nn.Parameter(torch.zeros(V)) if config.item_bias else None
        # log p(label id) in the training stream, for the logQ correction (not saved: set from the data)
        self.register_buffer("label_log_q", torch.zeros(V), persistent=False)
        init_linear_weights(self)

    @property
    def output_dim(self) -> int:
        return self.config.d_model

    @property
    def label_index(self) -> int:
        return [f.name for f in self.features].index(self.config.label_feature)

    @property
    def tables(self) -> nn.ParameterDict:
        return self.embed.tables

    # ---- user tower -----------------------------------------------------------------------------
    def forward(self, features: Sequence[torch.Tensor], lengths: torch.Tensor) -> EncoderOutput:
        L = features[0].shape[1]
        lengths = lengths.to(features[0].device)
        mask = length_mask(lengths, L)
        h = self.transformer(self.embed(features)) * mask.unsqueeze(-1)      # [B, L, d]
        B, d, k = h.shape[0], self.config.d_model, self.config.num_user_embeddings
        if self.config.fusion == "attention":
            H = self.config.n_heads
            key, val = self.kv(h).view(B, L, 2, H, d // H).unbind(2)           # [B, L, H, d/H]
            q = self.queries.to(h.dtype)
            att = kernels.latent_cross_attention(q, key, val, lengths)         # [B, k, H, d/H]
            u = self.fuse_ln(self.fuse_out(att.reshape(B, k, d)))
            u = u + self.fuse_mlp(u)
        else:
            pos = (lengths[:, None] - k + torch.arange(k, device=h.device)[None, :]).clamp_min(0)
            u = self.fuse_mlp(h.gather(1, pos.unsqueeze(-1).expand(B, k, d)))
        return EncoderOutput(u, torch.ones(B, k, dtype=torch.bool, device=h.device))

    def set_label_frequencies(self, counts: torch.Tensor) -> None:
        """counts: [V] occurrences of every label id among the training labels; add-one smoothed into
        ``label_log_q`` = log p(id) for the logQ correction of in-batch negatives."""
        if counts.shape != self.label_log_q.shape:
            raise ValueError(f"label counts must be [{self.label_log_q.shape[0]}], got {tuple(counts.shape)}")
        counts = counts.double().clamp_min(0) + 1.0
        self.label_log_q.copy_((counts / counts.sum()).log().to(self.label_log_q.dtype))

    # ---- label tower ----------------------------------------------------------------------------
    def label_embeddings(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Label-tower outputs [N, d] for ids [N] (ids >= 0), or for the whole vocabulary when None."""
        table = self.embed.tables[self.config.label_feature]
        rows = table if ids is None else table[ids]
        return self.label_mlp(rows)

    def _operands(self, user: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """float32 (user, labels) as the score multiplies them, and the scale: unit vectors over the
        temperature for the cosine, the raw vectors and 1 for the dot product."""
        if self.config.score == "dot":
            return user.float(), labels.float(), 1.0
        return (F.normalize(user.float(), dim=-1), F.normalize(labels.float(), dim=-1),
                1.0 / self.config.temperature)

    def scores(self, user: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """user [B, k, d], labels [C, d] -> float32 [B, C] = max_j sim(user_j, label) (``score``: cosine
        over the temperature, or the dot product)."""
        u, v, scale = self._operands(user, labels)
        return torch.einsum("bkd,cd->bkc", u, v).amax(dim=1) * scale

    def bias(self, ids: torch.Tensor | None = None) -> torch.Tensor | float:
        """float32 [C]: the per-item bias of ids [C] (of every id when None); 0.0 without ``item_bias``."""
        if self.label_bias is None:
            return 0.0
        return (self.label_bias if ids is None else self.label_bias[ids]).float()

    def logits(self, user: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """user [B, k, d], ids [C] (None: every id) -> float32 [B, C]: :meth:`scores` plus :meth:`bias`."""
        return self.scores(user, self.label_embeddings(ids)) + self.bias(ids)

    def split_history(self, features: Sequence[torch.Tensor], lengths: torch.Tensor
                      ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """A window of n events -> (its first n - 1 events as history, lengths - 1, label ids [B])."""
        lengths = lengths.to(features[0].device)
        last = (lengths - 1).clamp_min(0)
        rows = torch.arange(len(lengths), device=lengths.device)
        label = features[self.label_index][rows, last].clone()
        if label.dim() > 1:
            raise ValueError("the dual encoder's label feature must be single-valued")
        label[lengths < 2] = -1
        history = []
        for x in features:
            x = x.clone()
            x[rows, last] = -1                                                 # hide the label event
            history.append(x)
        return history, last, label

    def next_event_loss(self, features: Sequence[torch.Tensor], lengths: torch.Tensor
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``targets="last"``: each window's last real event is the label, the events before it the history.
        ``targets="all"``: every real event after the first is a label, the events before it its history
        (with ``fusion="last"``, k = 1 the user embedding of a prefix is the MLP of the causal Transformer's
        output at its last event, so one pass over the window yields every prefix's user embedding; the
        candidates of the in-batch / mixed negatives are then all the labels of the batch's windows).

        Returns (loss, {label_feature: detached loss}); windows with < 2 events and UNK labels are ignored.
        """
        if self.config.targets == "all":
            user, label = self.prefix_users(features, lengths)
        else:
            history, hist_len, label = self.split_history(features, lengths)
            keep = label > 0
            user = self.forward([x[keep] for x in history], hist_len[keep]).embeddings if bool(keep.any()) else None
            label = label[keep]
        if user is None or not bool((label > 0).any()):
            zero = self.fuse_mlp[0].weight.sum() * 0.0
            return zero, {}
        return self.contrastive_loss(user, label)

    def prefix_users(self, features: Sequence[torch.Tensor], lengths: torch.Tensor
                     ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(user embeddings [B * (L - 1), 1, d] of every prefix of the windows, labels [B * (L - 1)]: the next
        event's id, -1 where it is padding or UNK), or (None, empty) when no prefix has a real label. Needs
        fusion "last" and k = 1 (checked by the config).

        Every position is kept, not only the labelled ones, so that each step's [B * (L - 1), V] logits have
        one shape: with a different row count every step (the labelled prefixes), the training loop's
        no-mmap heap (``userllm.utils.memory.reuse_freed_memory``) fragmented and grew by ~50 MB a step, to
        12 GB and the OOM killer in ~500 steps (ml-latest-small, window 50, ``--negatives all``; 2026-12-05)."""
        L = features[0].shape[1]
        lengths = lengths.to(features[0].device)
        mask = length_mask(lengths, L)
        label_ids = features[self.label_index]
        if label_ids.dim() > 2:
            raise ValueError("the dual encoder's label feature must be single-valued")
        src = mask[:, 1:] & (label_ids[:, 1:] > 0)                             # [B, L - 1]
        if L < 2 or not bool(src.any()):
            return None, label_ids.new_zeros(0)
        h = self.transformer(self.embed(features))[:, :-1]                     # [B, L - 1, d]
        return self.fuse_mlp(h).reshape(-1, 1, h.shape[-1]), label_ids[:, 1:].masked_fill(~src, -1).reshape(-1)

    def contrastive_loss(self, user: torch.Tensor, label: torch.Tensor
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Softmax cross-entropy of label [B] for user embeddings [B, k, d] against the ``negatives``
        candidates (module docstring). Rows whose label is not a real id (<= 0) are ignored, and are no
        candidate of the other rows."""
        valid = label > 0
        ids = label.clamp_min(0)                                              # lookups; invalid rows masked
        rows = torch.arange(len(label), device=label.device)
        ignored = torch.full_like(label, IGNORE)
        if self.config.negatives == "in_batch":
            logits = self.logits(user, ids)                                   # [B, B]
            if self.config.logq_correction:
                logits = logits - self.label_log_q[ids][None, :]              # column j: candidate label j
            same = ids[:, None] == ids[None, :]
            eye = torch.eye(len(label), dtype=torch.bool, device=label.device)
            logits = logits.masked_fill((same | ~valid[None, :]) & ~eye, float("-inf"))
            target = torch.where(valid, rows, ignored)
        elif self.config.negatives == "mixed":
            V = self.features[self.label_index].num_embeddings
            B, n = len(label), self.config.num_negatives
            neg = torch.randint(1, max(V, 2), (n,), device=label.device)   # uniform over real ids
            cand = torch.cat([ids, neg])                                     # [B + n]
            logits = self.logits(user, cand)                                  # [B, B + n]
            if self.config.logq_correction:
                drawn = int(valid.sum())                                     # the in-batch draws
                expected = drawn * self.label_log_q[cand].double().exp() + n / max(V - 1, 1)
                logits = logits - expected.log().float()[None, :]
            own = torch.zeros(B, B + n, dtype=torch.bool, device=label.device)
            own[rows, rows] = True
            dropped = (cand[None, :] == ids[:, None]) | torch.cat([~valid, valid.new_zeros(n)])[None, :]
            logits = logits.masked_fill(dropped & ~own, float("-inf"))
            target = torch.where(valid, rows, ignored)
        elif self.config.negatives == "all":
            logits = self.logits(user)                                        # [B, V]
            logits[:, 0] = float("-inf")                                     # UNK is never a candidate
            target = torch.where(valid, label, ignored)
        else:
            V = self.features[self.label_index].num_embeddings
            # Uniform over real ids 1..V-1 (UNK 0 never a candidate); drawn from torch's RNG so that
            # checkpoints restore the stream.
            neg = torch.randint(1, max(V, 2), (self.config.num_negatives,), device=label.device)
            u, v, scale = self._operands(user, self.label_embeddings(ids))
            pos = torch.einsum("bkd,bd->bk", u, v).amax(dim=1) * scale + self.bias(ids)
            neg_s = self.logits(user, neg)                                    # [B, n]
            neg_s = neg_s.masked_fill(neg[None, :] == ids[:, None], float("-inf"))
            logits = torch.cat([pos[:, None], neg_s], dim=1)
            target = torch.where(valid, torch.zeros_like(label), ignored)
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE)
        return loss, {self.config.label_feature: loss.detach()}

    @torch.no_grad()
    def score_next(self, features: Sequence[torch.Tensor], lengths: torch.Tensor, feature: str | None = None
                   ) -> torch.Tensor:
        """Scores float32 [B, V] of every label id for the event after each history."""
        if feature is not None and feature != self.config.label_feature:
            raise ValueError(f"the dual encoder scores only its label feature {self.config.label_feature!r}")
        user = self.forward(features, lengths).embeddings
        return self.logits(user)
