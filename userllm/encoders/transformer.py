"""Building blocks shared by the user encoders: early-fusion event embedding and a causal Transformer.

Sequences are right padded everywhere: event ``t`` of row ``b`` is real iff ``t < lengths[b]``. With
causal attention a real position only ever attends to positions ``<= t``, which are all real, so the
causal mask alone keeps padding out of every real output (no extra key-padding mask is needed, and
``scaled_dot_product_attention(is_causal=True)`` can use its fused kernels). Outputs at padded
positions are defined (finite) but meaningless; the encoders zero them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from userllm import kernels


@dataclass(frozen=True)
class Feature:
    """What an encoder needs to know about one input feature.

    Mirrors ``userllm.data.dataset.FeatureSpec`` (any object with ``name``, ``num_embeddings`` and
    ``multi_valued`` converts via :func:`as_features`), plus the feature's embedding width ``dim``.
    """

    name: str
    num_embeddings: int
    multi_valued: bool = False
    dim: int = 0          # 0 = pick with default_dim(num_embeddings)


def default_dim(num_embeddings: int) -> int:
    """A width that grows with the vocabulary: 8 for tiny vocabularies (ratings), up to 64 for items."""
    if num_embeddings <= 16:
        return 8
    if num_embeddings <= 256:
        return 16
    if num_embeddings <= 4096:
        return 32
    return 64


def as_features(specs: Sequence[Any], dims: Sequence[int] | dict[str, int] | None = None) -> list[Feature]:
    """Turn FeatureSpec-like objects or dicts into :class:`Feature` with per-feature embedding widths.

    ``dims`` is a list in spec order, a ``{name: dim}`` dict, or None (then :func:`default_dim`, or the
    spec's own ``dim`` if it has one).
    """
    out = []
    for i, s in enumerate(specs):
        if isinstance(s, dict):
            s = Feature(**s)
        name, n, multi = s.name, int(s.num_embeddings), bool(s.multi_valued)
        if isinstance(dims, dict):
            dim = dims.get(name)
        elif dims is not None:
            dim = dims[i]
        else:
            dim = None
        if dim is None:
            dim = getattr(s, "dim", None) or default_dim(n)
        if n < 1 or int(dim) < 1:
            raise ValueError(f"feature {name!r}: num_embeddings and dim must be >= 1, got {n}, {dim}")
        out.append(Feature(name, n, multi, int(dim)))
    if not out:
        raise ValueError("an encoder needs at least one feature")
    if len({f.name for f in out}) != len(out):
        raise ValueError(f"feature names must be unique, got {[f.name for f in out]}")
    return out


def features_to_json(features: Sequence[Feature]) -> list[dict]:
    return [asdict(f) for f in features]


@dataclass
class EncoderOutput:
    """embeddings: float [B, L, d] (zeros where ``mask`` is False); mask: bool [B, L], True = real event."""

    embeddings: torch.Tensor
    mask: torch.Tensor


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """bool [B, max_len]: True at positions < lengths[b] (right padding)."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class EventEmbedding(nn.Module):
    """Early fusion: per-feature tables -> ``kernels.embedding_concat`` -> linear to d_model + positions.

    tables[name]: float [V_i, D_i]; ids < 0 are padding (zeros), multi-valued features are mean-pooled.
    """

    def __init__(self, features: Sequence[Feature], d_model: int, max_len: int, dropout: float):
        super().__init__()
        self.features = list(features)
        self.tables = nn.ParameterDict({
            f.name: nn.Parameter(torch.randn(f.num_embeddings, f.dim) * f.dim ** -0.5) for f in self.features
        })
        self.proj = nn.Linear(sum(f.dim for f in self.features), d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.max_len = max_len

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: per feature int [B, L] or [B, L, K] -> float [B, L, d_model]."""
        if len(features) != len(self.features):
            raise ValueError(f"expected {len(self.features)} feature tensors "
                             f"({[f.name for f in self.features]}), got {len(features)}")
        L = features[0].shape[1]
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds the encoder's max_len {self.max_len}")
        tables = [self.tables[f.name] for f in self.features]
        x = kernels.embedding_concat(list(features), tables, pooling="mean")   # [B, L, sum D_i]
        x = self.proj(x) + self.pos[:L]
        return self.drop(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, L, C))

    def forward_last(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Row ``b``'s output at position ``last[b]`` alone: float [B, C], bit-identical to ``forward(x)[b, last[b]]``.

        x: float [B, L, C]; last: int64 [B] in [0, L). The projections and the causal attention run over
        every position as in :meth:`forward` (one query row of SDPA with a key mask instead would differ in
        the last bits: 15 of 5,120 MovieLens-20M ranks moved by one); only the output projection runs at
        ``last`` alone.
        """
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2)[torch.arange(B, device=x.device), last].reshape(B, C))


class Block(nn.Module):
    """Pre-LN Transformer block (nanoGPT style)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, ffn_mult: int = 4):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, ffn_mult * d_model), nn.GELU(),
                                 nn.Linear(ffn_mult * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))

    def forward_last(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """float [B, d]: ``forward(x)[b, last[b]]`` with the residual, LayerNorm and MLP at that position only
        (x [B, L, d], last int64 [B])."""
        h = x[torch.arange(len(last), device=x.device), last]
        h = h + self.drop(self.attn.forward_last(self.ln1(x), last))
        return h + self.drop(self.mlp(self.ln2(h)))


class CausalTransformer(nn.Module):
    """Stack of causal pre-LN blocks with a final LayerNorm: [B, L, d] -> [B, L, d]."""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward_last(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """float [B, d]: ``forward(x)[b, last[b]]``, bit for bit. Only the last block is cut to one position
        (the blocks before it feed its keys and values at every position): its output projection, second
        LayerNorm, MLP and the final LayerNorm run on B rows instead of B x L, about 2/3 of that block's
        work at window 50 (measured in benchmarks/RESULTS.md, the 20M full ranking)."""
        for block in self.blocks[:-1]:
            x = block(x)
        return self.ln_f(self.blocks[-1].forward_last(x, last))


def init_linear_weights(module: nn.Module) -> None:
    """GPT-2 style init for Linear layers (the embedding tables keep their own scale)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

