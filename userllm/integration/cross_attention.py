"""Flamingo-style gated cross-attention from the LLM's text stream to the user tokens.

A :class:`GatedCrossAttentionBlock` runs right before chosen decoder layers of a Hugging Face causal LM:

    h = h + tanh(attn_gate) * o_proj(cached_cross_attention(q_proj(LN(h)), K_user, V_user, kv_lengths))
    h = h + tanh(ffn_gate)  * FFN(LN(h))

Both gates start at ``gate_init``. At 0 (the block's default, Flamingo's choice, and what
``python -m userllm.train`` uses with a pretrained ``--llm``) tanh(0) = 0 and the LLM computes exactly what
it computed without the user side; the embedded random LLM starts them slightly open (0.1, see
:attr:`userllm.config.TrainConfig.gate_init`). Keys are masked by the user lengths (never causally: every text token may read every event). A row
without history (kv_length 0) leaves its hidden states untouched.

The blocks are attached to the decoder layers with forward pre-hooks (:func:`attach_cross_attention`)
rather than by replacing the layers: the LLM's module tree, parameter names, checkpoints, LoRA target
names and per-layer attributes (``attention_type`` ...) stay those of the stock model, every argument and
keyword of the layer call and whatever the layer returns (tensor or tuple) pass through unchanged; only
the hidden states entering the layer are replaced.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from userllm import kernels

from .layers import FeedForward, UserContext


class GatedCrossAttentionBlock(nn.Module):
    """Gated cross-attention + gated FFN over a user K/V cache.

    d_model: LLM width; n_heads query heads, n_kv_heads K/V heads (n_heads % n_kv_heads == 0, grouped
    query attention); head_dim defaults to d_model // n_heads. gate_init: initial value of both gate
    parameters (0 = Flamingo: the block is the identity at init).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 ffn_mult: int = 4, dropout: float = 0.0, gate_init: float = 0.0):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"cross-attention heads {n_heads} must be a multiple of kv heads {n_kv_heads}")
        head_dim = d_model // n_heads if head_dim is None else head_dim
        if head_dim <= 0:
            raise ValueError(f"cross-attention head_dim must be positive (d_model={d_model}, heads={n_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.norm = nn.LayerNorm(d_model)
        self.norm_kv = nn.LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_mult, dropout)
        self.dropout = nn.Dropout(dropout)
        # tanh(0) = 0: with the default gate_init the block is the identity at init and opens as the gates learn.
        self.attn_gate = nn.Parameter(torch.full((1,), float(gate_init)))
        self.ffn_gate = nn.Parameter(torch.full((1,), float(gate_init)))

    def project_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """User states [B, N, d_model] -> (K, V), each [B, N, n_kv_heads, head_dim]. Run once per request."""
        B, N, _ = states.shape
        x = self.norm_kv(states.to(self.k_proj.weight.dtype))
        k = self.k_proj(x).view(B, N, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, N, self.n_kv_heads, self.head_dim)
        return k, v

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                kv_lengths: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, d_model] (any float dtype) -> [B, T, d_model] in hidden's dtype."""
        B, T, _ = hidden.shape
        x = hidden.to(self.q_proj.weight.dtype)
        q = self.q_proj(self.norm(x)).view(B, T, self.n_heads, self.head_dim)
        attn = kernels.cached_cross_attention(q, keys, values, kv_lengths)       # [B, T, Hq, D]; 0 for empty rows
        x = x + torch.tanh(self.attn_gate) * self.dropout(self.o_proj(attn.reshape(B, T, -1)))
        x = x + torch.tanh(self.ffn_gate) * self.dropout(self.ffn(self.ffn_norm(x)))
        # Rows without history skip the block entirely (the FFN would otherwise still move them).
        has_user = (kv_lengths > 0).to(hidden.device)[:, None, None]
        return torch.where(has_user, x.to(hidden.dtype), hidden)


class CrossAttentionHook:
    """Forward pre-hook running block ``index`` of ``owner`` on the hidden states entering a decoder layer.

    ``owner`` provides ``xattn`` (the blocks) and ``context_for_batch(B) -> UserContext | None``. Without a
    context (plain LLM use) the layer input passes through untouched.
    """

    def __init__(self, owner: nn.Module, index: int):
        self.owner = owner
        self.index = index

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        if args:
            hidden = args[0]
        elif "hidden_states" in kwargs:
            hidden = kwargs["hidden_states"]
        else:
            raise TypeError(f"{type(module).__name__} was called without hidden states")
        if isinstance(hidden, (tuple, list)):     # some old-style layers take (hidden, ...) tuples
            raise TypeError(f"{type(module).__name__} takes a tuple as hidden states; not supported")
        context: UserContext | None = self.owner.context_for_batch(hidden.shape[0])
        if context is None:
            return None
        block: GatedCrossAttentionBlock = self.owner.xattn[self.index]
        if context.cached:
            keys, values = context.keys[self.index], context.values[self.index]
        else:
            keys, values = block.project_kv(context.states)
        hidden = block(hidden, keys, values, context.kv_lengths)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


def attach_cross_attention(layers: nn.ModuleList, layer_indices: list[int],
                           make_hook: Callable[[int], CrossAttentionHook]) -> list:
    """Register block ``i``'s hook before decoder layer ``layer_indices[i]``; returns the hook handles."""
    handles = []
    for i, layer_idx in enumerate(layer_indices):
        handles.append(layers[layer_idx].register_forward_pre_hook(make_hook(i), with_kwargs=True))
    return handles
