"""Perceiver resampler: a fixed number of learned latents summarise a variable-length user history.

Each layer: latents = latents + attn(LN(latents) -> events) ; latents = latents + FFN(LN(latents)); a final
LayerNorm. The latents attend only to the real events (key-padding mask from the lengths) through
``userllm.kernels.latent_cross_attention``; the first layer passes the batch-shared latents [M, H, D]
so the op can broadcast them without materialising B copies.
"""

from __future__ import annotations

import torch
from torch import nn

from userllm import kernels

from .layers import FeedForward


class PerceiverLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"perceiver width {d_model} is not divisible by its {n_heads} heads")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.norm_latents = nn.LayerNorm(d_model)
        self.norm_events = nn.LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_mult, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, latents: torch.Tensor, events: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """latents [M, d] (shared) or [B, M, d]; events [B, N, d]; lengths int [B] -> [B, M, d]."""
        B, N, d = events.shape
        H, D = self.n_heads, self.head_dim
        ev = self.norm_events(events)
        k = self.k_proj(ev).view(B, N, H, D)
        v = self.v_proj(ev).view(B, N, H, D)
        q = self.q_proj(self.norm_latents(latents))
        q = q.view(*q.shape[:-1], H, D)                                  # [M, H, D] or [B, M, H, D]
        attn = kernels.latent_cross_attention(q, k, v, lengths)          # [B, M, H, D]
        M = attn.shape[1]
        latents = latents + self.dropout(self.o_proj(attn.reshape(B, M, d)))   # broadcasts shared latents
        return latents + self.dropout(self.ffn(self.ffn_norm(latents)))


class PerceiverResampler(nn.Module):
    """[B, N, d] events (right padded, ``lengths`` int [B]) -> [B, M, d] latents and their lengths.

    Output lengths are M for every row with at least one event and 0 for rows without history (their
    latents carry no user information and must stay masked downstream).
    """

    def __init__(self, d_model: int, n_latents: int, n_layers: int = 1, n_heads: int = 4, ffn_mult: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        if n_latents <= 0 or n_layers <= 0:
            raise ValueError(f"perceiver needs latents > 0 and layers > 0, got {n_latents}, {n_layers}")
        self.latents = nn.Parameter(torch.randn(n_latents, d_model) * 0.02)
        self.layers = nn.ModuleList(PerceiverLayer(d_model, n_heads, ffn_mult, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)

    @property
    def n_latents(self) -> int:
        return self.latents.shape[0]

    def forward(self, events: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.latents.to(events.dtype)
        for layer in self.layers:
            latents = layer(latents, events, lengths)
        out_lengths = torch.where(lengths > 0, self.n_latents, 0).to(torch.int64)
        return self.norm(latents), out_lengths
