"""Next-item readout tokens: the user encoder's top-K next-item beliefs as extra user tokens (issue 14).

The per-event embeddings of User-LLM carry what the encoder knows about the next item only implicitly:
the AR encoder's last state ranks the next item through its tied softmax head (``head_proj(h) @ table^T``),
a map the cross-attention would have to learn again, title by title, from the task's few examples per
item. On ml-latest-small it did not: the encoder alone is at 1.75x popularity's Recall@10 while the
LLM reading its per-event embeddings is at or below popularity's level, and its target loss does not
move when the users' histories are shuffled (README, "NextItem on ml-latest-small").

Measured there (README): in 300 steps, or 2000 of distillation, the LLM did not learn to copy from these
tokens by itself, so they are off by default (``--readout-tokens 0``); the caption stage below teaches
the copy (best so far: R@10 0.0230 with ``--readout-title-tokens 4`` or 8).

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

**Pointer** (``--readout-pointer``, ``copy=True``): with P > 0 title tokens, each readout token also carries
the id of the token it stands for (``title_ids``: the title's answer tokens, then EOS), and a pointer
head (:mod:`userllm.integration.copy_head`) lets the LLM write that token by pointing at it.

**Caption stage** (``--caption-steps``, :class:`userllm.distill.CaptionStage`): inside
:meth:`NextItemReadout.candidates_replaced` given items take the places of a row's best candidates (each
keeps the score of the candidate it replaces, so the score profile stays the encoder's), and the label is
one of them, so the LLM learns to write the title a readout token stands for, for any catalogue item.
Measured on ml-latest-small (README "NextItem", session 6): after 2000 distillation steps without it, a
random item put in the top-1 place lowered its title's loss by 0.02 nats per token (3.73 vs 3.75 when
absent): the LLM did not read the readout; after 1500 caption steps (``--caption-replace 1``, temperature
0.2) by 1.5 (P = 4) to 3.1 (P = 12).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from .copy_head import CopyHead


class NextItemReadout(nn.Module):
    """K readout candidates from next-item scores, one token each or, with ``title_tokens`` P > 0, P each.

    num_items: V, the encoder's item vocabulary (id 0 = UNK, never a candidate); d_model: the LLM width;
    k: candidates per request. ``title_vectors`` (a persistent buffer, so checkpoints keep it) starts at
    zero and is filled by :meth:`set_title_vectors` before training: float [V, d_model] (the mean of the
    title's token embeddings) when P = 0, float [V, P, d_model] (its first P token embeddings, zeros past
    the end) when P > 0. Then candidate k's token j is

        adapter(E[t_j]) + prev_adapter(E[t_{j-1}]) + position_embedding[j] + rank_embedding[k] + log p * score_direction

    (``E[t_{-1}]`` = a learned start vector): each token pairs a title token with the one before it, so a
    cross-attention query that holds the token just written can find what follows it in a candidate's
    title (the copy an induction head makes), where the mean vector only says which tokens occur.
    """

    def __init__(self, num_items: int, d_model: int, k: int, title_tokens: int = 0, copy: bool = False):
        super().__init__()
        if k < 1 or num_items < 2:
            raise ValueError(f"readout needs k >= 1 and at least 2 items, got k={k}, num_items={num_items}")
        if k > num_items - 1:
            raise ValueError(f"readout k={k} exceeds the {num_items - 1} real items")
        if title_tokens < 0:
            raise ValueError(f"readout title_tokens must be >= 0, got {title_tokens}")
        self.k, self.num_items, self.title_tokens = k, num_items, title_tokens
        shape = (num_items, d_model) if title_tokens == 0 else (num_items, title_tokens, d_model)
        self.register_buffer("title_vectors", torch.zeros(shape))
        self.adapter = nn.Linear(d_model, d_model)
        with torch.no_grad():
            self.adapter.weight.copy_(torch.eye(d_model))
            self.adapter.bias.zero_()
        self.rank_embedding = nn.Parameter(torch.zeros(k, d_model))
        self.score_direction = nn.Parameter(torch.zeros(d_model))
        if title_tokens:
            # A random rotation, not the identity: the value projection can then tell the token to write
            # (identity adapter) from the one it follows.
            self.prev_adapter = nn.Linear(d_model, d_model, bias=False)
            with torch.no_grad():
                q, _ = torch.linalg.qr(torch.randn(d_model, d_model, generator=torch.Generator().manual_seed(1)))
                self.prev_adapter.weight.copy_(q)
            self.start = nn.Parameter(torch.zeros(d_model))
            self.position_embedding = nn.Parameter(torch.zeros(title_tokens, d_model))
        self.copy_head = None
        if copy:
            if not title_tokens:
                raise ValueError("the readout's copy head needs title tokens (title_tokens P > 0) to point at")
            # int64 [V, P]: the token candidate token j writes (the title's answer tokens, then EOS; -1 past
            # them), filled by set_title_ids; persistent, so a reloaded run needs no tokenizer pass.
            self.register_buffer("title_ids", torch.full((num_items, title_tokens), -1, dtype=torch.long))
            self.copy_head = CopyHead(d_model)
        self._replace: torch.Tensor | None = None

    @property
    def tokens_per_request(self) -> int:
        return self.k * max(1, self.title_tokens)

    @torch.no_grad()
    def set_title_vectors(self, vectors: torch.Tensor) -> None:
        """vectors: float [V, d_model] or [V, P, d_model] (class docstring); also scales the learned
        embeddings' init to them."""
        if vectors.shape != self.title_vectors.shape:
            raise ValueError(f"title vectors must be {tuple(self.title_vectors.shape)}, got {tuple(vectors.shape)}")
        self.title_vectors.copy_(vectors)
        real = vectors[1:].float()
        filled = real[real.abs().sum(-1) > 0]                     # the title vectors of real tokens
        std = float(filled.std()) if len(filled) else 1.0
        g = torch.Generator().manual_seed(0)
        self.rank_embedding.copy_(torch.randn(self.rank_embedding.shape, generator=g) * std)
        if self.title_tokens:
            self.start.copy_(torch.randn(self.start.shape, generator=g) * std)
            self.position_embedding.copy_(torch.randn(self.position_embedding.shape, generator=g) * std)

    @torch.no_grad()
    def set_title_ids(self, ids: torch.Tensor) -> None:
        """ids: int64 [V, P] (``title_token_ids``); only with the copy head."""
        if self.copy_head is None:
            raise ValueError("set_title_ids: this readout has no copy head")
        if ids.shape != self.title_ids.shape:
            raise ValueError(f"title ids must be {tuple(self.title_ids.shape)}, got {tuple(ids.shape)}")
        self.title_ids.copy_(ids)

    @contextmanager
    def candidates_replaced(self, items: torch.Tensor) -> Iterator[None]:
        """Within the block, ``items`` (int64 [B, J], J <= K, real ids >= 1) are row b's candidates 0..J-1, each
        with the score of the encoder's candidate it replaces (the caption stage; module docstring)."""
        if items.ndim != 2 or items.shape[1] > self.k:
            raise ValueError(f"candidates_replaced: items must be [B, J] with J <= {self.k}, got {tuple(items.shape)}")
        saved, self._replace = self._replace, items
        try:
            yield
        finally:
            self._replace = saved

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """scores float [B, V] (any real scores; log-softmaxed here) -> tokens [B, K * max(1, P), d_model]."""
        return self.tokens_and_ids(scores)[0]

    def tokens_and_ids(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`forward`, plus int64 [B, K * P]: the token each readout token writes for the copy head
        (-1 = none), or None without the copy head."""
        with torch.no_grad():
            logp = torch.log_softmax(scores.float(), dim=-1)
            logp[:, 0] = float("-inf")                       # UNK is never a candidate
            top, idx = logp.topk(self.k, dim=-1)
            if self._replace is not None:
                if self._replace.shape[0] != idx.shape[0]:
                    raise ValueError(f"candidates_replaced: items for {self._replace.shape[0]} rows, "
                                     f"scores for {idx.shape[0]}")
                idx = idx.clone()
                idx[:, :self._replace.shape[1]] = self._replace.to(idx.device)
        dtype = self.adapter.weight.dtype
        score = top.to(dtype)[..., None] * self.score_direction.to(dtype)                # [B, K, d]
        if not self.title_tokens:
            return self.adapter(self.title_vectors[idx].to(dtype)) + self.rank_embedding.to(dtype) + score, None
        nxt = self.title_vectors[idx].to(dtype)                                           # [B, K, P, d]
        B, K, P, d = nxt.shape
        prev = torch.cat([self.start.to(dtype).expand(B, K, 1, d), nxt[:, :, :-1]], dim=2)
        tokens = (self.adapter(nxt) + self.prev_adapter(prev) + self.position_embedding.to(dtype)
                  + (self.rank_embedding.to(dtype) + score)[:, :, None])
        ids = None if self.copy_head is None else self.title_ids[idx].reshape(B, K * P)
        return tokens.reshape(B, K * P, d), ids


def title_vectors(llm: nn.Module, token_ids: Sequence[Sequence[int]], title_tokens: int = 0) -> torch.Tensor:
    """The readout's title vectors from the LLM's input embeddings E. ``title_tokens`` = 0: float32 [V, d],
    row i = the mean of E over ``token_ids[i]`` (zeros for an empty list); P > 0: float32 [V, P, d], row i =
    E of its first P tokens (zeros past the end)."""
    emb = llm.get_input_embeddings().weight.detach().float().cpu()
    shape = (len(token_ids), emb.shape[1]) if title_tokens == 0 else (len(token_ids), title_tokens, emb.shape[1])
    out = torch.zeros(shape)
    for i, ids in enumerate(token_ids):
        if len(ids):
            e = emb[torch.as_tensor(list(ids), dtype=torch.long)]
            if title_tokens == 0:
                out[i] = e.mean(0)
            else:
                out[i, :min(len(ids), title_tokens)] = e[:title_tokens]
    return out


def title_token_ids(token_ids: Sequence[Sequence[int]], title_tokens: int, eos_id: int) -> torch.Tensor:
    """The copy head's int64 [V, P]: row i = ``token_ids[i]`` followed by ``eos_id``, cut to P, -1 past the end
    (a row with no tokens, such as UNK's, stays all -1: nothing to copy)."""
    out = torch.full((len(token_ids), title_tokens), -1, dtype=torch.long)
    for i, ids in enumerate(token_ids):
        if len(ids):
            row = (list(ids) + [eos_id])[:title_tokens]
            out[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
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


def ids_after(lengths: torch.Tensor, total: int, ids: torch.Tensor) -> torch.Tensor:
    """The copy ids of :func:`append_tokens`' output: int64 [B, total], ``ids`` [B, K] at the same places as the
    appended tokens (right after each row's ``lengths`` valid states, before the append), -1 elsewhere."""
    B, K = ids.shape
    out = torch.full((B, total), -1, dtype=torch.long, device=ids.device)
    cols = lengths.to(ids.device)[:, None] + torch.arange(K, device=ids.device)[None]
    return out.scatter_(1, cols, ids)
