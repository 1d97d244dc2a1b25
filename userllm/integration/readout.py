"""Next-item readout tokens: the user encoder's top-K next-item beliefs as extra user tokens (issue 14).

The per-event embeddings of User-LLM carry what the encoder knows about the next item only implicitly:
the AR encoder's last state ranks the next item through its tied softmax head (``head_proj(h) @ table^T``),
a map the cross-attention would have to learn again, title by title, from the task's few examples per
item. On ml-latest-small it did not: the encoder alone is at 1.75x popularity's Recall@10 while the
LLM reading its per-event embeddings is at or below popularity's level, and its target loss does not
move when the users' histories are shuffled (README, "NextItem on ml-latest-small").

Measured there (README): in 300 steps the LLM did not learn to copy from these tokens either, through
cross-attention or as a soft prompt, so they are off by default (``--readout-tokens 0``); the module
stays as the starting point of a caption stage (issue 14).

A :class:`NextItemReadout` makes that knowledge readable. For each request it takes the encoder's
next-item scores [B, V] (``encoder.score_next``), keeps the K best items and turns each into one token
in the LLM's width:

    token_k = adapter(title_vector[item_k]) + rank_embedding[k] + log p(item_k) * score_direction

``title_vector[i]`` is the mean of the LLM's input embeddings of item i's title tokens (the same tokens
the LLM writes as the answer), so a token already "says" its title in the LLM's own vocabulary and the
LLM only has to learn which of the K to write: no title has to be memorised behind an opaque item id.
The tokens join the per-event user tokens (after the Perceiver, if any), so cross-attention or the soft
prompt read both. ``adapter`` starts as the identity; the rank embeddings and the score direction
tell the LLM the encoder's order and confidence.

The candidate choice (top-K) carries no gradient: the encoder is read, not trained, through this path.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class NextItemReadout(nn.Module):
    """K readout tokens from next-item scores.

    num_items: V, the encoder's item vocabulary (id 0 = UNK, never a candidate); d_model: the LLM width;
    k: tokens per request. ``title_vectors`` (float [V, d_model], a persistent buffer, so checkpoints keep
    it) starts at zero and is filled by :meth:`set_title_vectors` before training.
    """

    def __init__(self, num_items: int, d_model: int, k: int):
        super().__init__()
        if k < 1 or num_items < 2:
            raise ValueError(f"readout needs k >= 1 and at least 2 items, got k={k}, num_items={num_items}")
        if k > num_items - 1:
            raise ValueError(f"readout k={k} exceeds the {num_items - 1} real items")
        self.k = k
        self.register_buffer("title_vectors", torch.zeros(num_items, d_model))
        self.adapter = nn.Linear(d_model, d_model)
        with torch.no_grad():
            self.adapter.weight.copy_(torch.eye(d_model))
            self.adapter.bias.zero_()
        self.rank_embedding = nn.Parameter(torch.zeros(k, d_model))
        self.score_direction = nn.Parameter(torch.zeros(d_model))

    @torch.no_grad()
    def set_title_vectors(self, vectors: torch.Tensor) -> None:
        """vectors float [V, d_model] (see the module docstring); also scales the rank embeddings' init to them."""
        if vectors.shape != self.title_vectors.shape:
            raise ValueError(f"title vectors must be {tuple(self.title_vectors.shape)}, got {tuple(vectors.shape)}")
        self.title_vectors.copy_(vectors)
        std = float(vectors[1:].float().std()) or 1.0
        g = torch.Generator().manual_seed(0)
        self.rank_embedding.copy_(torch.randn(self.rank_embedding.shape, generator=g) * std)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """scores float [B, V] (any real scores; log-softmaxed here) -> tokens [B, K, d_model]."""
        with torch.no_grad():
            logp = torch.log_softmax(scores.float(), dim=-1)
            logp[:, 0] = float("-inf")                       # UNK is never a candidate
            top, idx = logp.topk(self.k, dim=-1)
        dtype = self.adapter.weight.dtype
        tokens = self.adapter(self.title_vectors[idx].to(dtype))
        return tokens + self.rank_embedding.to(dtype) + top.to(dtype)[..., None] * self.score_direction.to(dtype)


def title_vectors(llm: nn.Module, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """float32 [V, d]: row i = the mean input embedding of ``token_ids[i]`` (zeros for an empty list)."""
    emb = llm.get_input_embeddings().weight.detach().float().cpu()
    out = torch.zeros(len(token_ids), emb.shape[1])
    for i, ids in enumerate(token_ids):
        if len(ids):
            out[i] = emb[torch.as_tensor(list(ids), dtype=torch.long)].mean(0)
    return out


def append_tokens(states: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded states [B, N, d] with lengths int64 [B], plus tokens [B, K, d] placed right after each
    row's valid states -> ([B, N + K, d], lengths + K), still right padded."""
    B, N, d = states.shape
    K = tokens.shape[1]
    out = torch.cat([states, states.new_zeros(B, K, d)], dim=1)
    rows = torch.arange(B, device=states.device)[:, None]
    cols = lengths.to(states.device)[:, None] + torch.arange(K, device=states.device)[None]
    out = out.index_put((rows.expand(B, K), cols), tokens.to(states.dtype))
    return out, lengths + K
