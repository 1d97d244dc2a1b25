"""SASRec (Kang & McAuley, ICDM 2018): the peer the autoregressive encoder is compared with.

Only the item ids of a history are read (SASRec has no side features); the other feature tensors of a
batch are accepted and ignored, so that the same windows, split and evaluation serve both encoders.

Architecture, as in the paper (section III) and its reference code (kang205/SASRec, ``model.py`` and
``modules.py``; the PyTorch port pmixer/SASRec.pytorch follows it too):

* input: ``E = M[item] * sqrt(d) + P[t]`` (item table M [V, d], learned positions P), dropout, then
  padded positions zeroed;
* ``n_layers`` blocks, each
  ``Q = LN(x); x = Q + Attn(Q W_q, x W_k, x W_v)`` (causal, dropout on the attention weights, no output
  projection: the paper's ``S = SA(E)``), then ``x = LN(x); x = x + Dropout(W_2 Dropout(ReLU(W_1 x)))``
  (the point-wise FFN, width d -> d -> d), then padded positions zeroed. The residuals start from the
  normalised input, as the reference code does (the paper's text writes ``x + Dropout(g(LN(x)))``);
* a final LayerNorm; the prediction of the item after position t is ``r = F_t . M[item]`` with the
  **same** item table (shared item embeddings), no bias.

Loss (``SASRecConfig.loss``):

* ``"bce"`` (the paper's): at every position whose next item is a real id, ``-log s(r_pos) - log(1 - s(r_neg))``
  with one negative per position drawn uniformly from the item ids (UNK excluded) that do not occur in the
  window (the reference code excludes the user's whole training sequence; a window is <= 50 of the user's
  events, and a uniform draw over 9.7k ml-latest-small items hits one of the rest with probability ~1 %);
  the mean over positions;
* ``"ce"``: the softmax cross-entropy over all items at every position (RecBole's default ``loss_type``).

Right padding with causal attention keeps padding out of every real output (``transformer`` module docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .autoregressive import EncoderConfig
from .transformer import EncoderOutput, length_mask

LOSSES = ("bce", "ce")
#: Rejection rounds of the negative sampler: after 4 rounds a draw is still in the window with probability
#: (50 / 9724)^4 on ml-latest-small; any left over are kept (a negligible label-noise, never an error).
NEGATIVE_DRAWS = 4


@dataclass
class SASRecConfig(EncoderConfig):
    """EncoderConfig (``feature_dims`` and ``loss_weights`` unused: the item table is [V, d_model]) plus
    ``loss`` ("bce" | "ce") and ``item_feature`` (the feature SASRec reads and predicts)."""

    loss: str = "bce"
    item_feature: str = "item"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        names = [f.name for f in self.feature_specs]
        if self.item_feature not in names:
            raise ValueError(f"item_feature {self.item_feature!r} is not a feature ({names})")


class SASRecBlock(nn.Module):
    """One self-attention block of SASRec (module docstring): [B, L, d] -> [B, L, d]."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.ln_attn = nn.LayerNorm(d, eps=1e-8)     # the reference code's epsilon
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.ln_ffn = nn.LayerNorm(d, eps=1e-8)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: float [B, L, d]; mask: bool [B, L] (True = real event)."""
        B, L, d = x.shape
        H = self.n_heads
        query = self.ln_attn(x)
        q, k, v = (proj(src).view(B, L, H, d // H).transpose(1, 2)
                   for proj, src in ((self.q, query), (self.k, x), (self.v, x)))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        x = query + att.transpose(1, 2).reshape(B, L, d)
        x = self.ln_ffn(x)
        x = x + self.ffn(x)
        return x * mask.unsqueeze(-1).to(x.dtype)


class SASRecEncoder(nn.Module):
    """SASRec over the item ids of event sequences.

    forward(features, lengths):
        features: list (spec order) of int64 [B, L] / [B, L, K], -1 padded, right padded (only the item
                  feature is read); lengths: int64 [B] in [0, L].
        returns   EncoderOutput(embeddings float [B, L, d_model] (zeros at padding), mask bool [B, L]).
    """

    kind = "sasrec"

    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = config
        self.features = list(config.feature_specs)
        d = config.d_model
        self.item_index = [f.name for f in self.features].index(config.item_feature)
        V = self.features[self.item_index].num_embeddings
        # A ParameterDict named like the other encoders' tables: the optimizer recipe leaves tables undecayed.
        self.tables = nn.ParameterDict({config.item_feature: nn.Parameter(torch.empty(V, d))})
        self.pos = nn.Parameter(torch.empty(config.max_len, d))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(d, config.n_heads, config.dropout) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(d, eps=1e-8)
        # Xavier-normal for every matrix, as the PyTorch reference port does (the TF code: Xavier/Glorot).
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.xavier_normal_(p)

    @property
    def output_dim(self) -> int:
        return self.config.d_model

    @property
    def item_table(self) -> nn.Parameter:
        """float [V, d_model]: the input embeddings and the output matrix of the prediction (shared)."""
        return self.tables[self.config.item_feature]

    def forward(self, features: Sequence[torch.Tensor], lengths: torch.Tensor) -> EncoderOutput:
        items = features[self.item_index]
        B, L = items.shape[:2]
        if L > self.config.max_len:
            raise ValueError(f"sequence length {L} exceeds the encoder's max_len {self.config.max_len}")
        mask = length_mask(lengths.to(items.device), L)
        x = self.item_table[items.clamp_min(0)] * math.sqrt(self.config.d_model) + self.pos[:L]
        x = self.drop(x) * mask.unsqueeze(-1).to(x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        x = self.ln_f(x)
        return EncoderOutput(x * mask.unsqueeze(-1).to(x.dtype), mask)

    def item_logits(self, hidden: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [..., d] -> float32 [..., V] (``ids`` None) or hidden [N, d], ids [N, m] -> [N, m]."""
        table = self.item_table.to(hidden.dtype)
        if ids is None:
            return (hidden @ table.t()).float()
        return torch.einsum("nd,nmd->nm", hidden, table[ids]).float()

    def sample_negatives(self, window_items: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """int64 [N]: for source position n (row ``rows[n]`` of ``window_items`` [B, L]) an id drawn
        uniformly from 1..V-1, redrawn (up to NEGATIVE_DRAWS times) while it occurs in that window."""
        V = self.item_table.shape[0]
        neg = torch.randint(1, max(V, 2), (len(rows),), device=window_items.device)
        for _ in range(NEGATIVE_DRAWS):
            clash = (window_items[rows] == neg[:, None]).any(dim=1)
            if not bool(clash.any()):
                break
            neg[clash] = torch.randint(1, max(V, 2), (int(clash.sum()),), device=neg.device)
        return neg

    def next_event_loss(self, features: Sequence[torch.Tensor], lengths: torch.Tensor
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Position t predicts the item of event t + 1 (loss per ``config.loss``, module docstring).

        Returns (loss: scalar float32, {item_feature: detached loss}); no valid target -> (0, {}).
        """
        out = self.forward(features, lengths)
        items = features[self.item_index]
        L = items.shape[1]
        if L < 2:
            return self.item_table.sum() * 0.0, {}
        src = out.mask[:, 1:] & (items[:, 1:] > 0)                    # real source with a real, known target
        if not bool(src.any()):
            return self.item_table.sum() * 0.0, {}
        hidden = out.embeddings[:, :-1][src]                          # [N, d]
        target = items[:, 1:][src]                                    # [N]
        if self.config.loss == "ce":
            loss = F.cross_entropy(self.item_logits(hidden), target)
        else:
            rows = torch.arange(items.shape[0], device=items.device)[:, None].expand(-1, L - 1)[src]
            neg = self.sample_negatives(items, rows)
            logits = self.item_logits(hidden, torch.stack([target, neg], dim=1))   # [N, 2]
            loss = (F.softplus(-logits[:, 0]) + F.softplus(logits[:, 1])).mean()
        return loss, {self.config.item_feature: loss.detach()}

    @torch.no_grad()
    def score_next(self, features: Sequence[torch.Tensor], lengths: torch.Tensor, feature: str | None = None
                   ) -> torch.Tensor:
        """Scores float32 [B, V] of every item id for the event after each history (rows with no history
        use position 0's output)."""
        if feature is not None and feature != self.config.item_feature:
            raise ValueError(f"SASRec scores only its item feature {self.config.item_feature!r}")
        out = self.forward(features, lengths)
        last = (out.mask.sum(1) - 1).clamp_min(0)
        h = out.embeddings[torch.arange(len(last), device=last.device), last]
        return self.item_logits(h)
