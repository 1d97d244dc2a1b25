"""Building blocks shared by the integrations: the user context, the projection, feed-forward, and
locating an HF causal LM's decoder layers by structure.

Conventions: user sequences are right padded; ``kv_lengths`` (int64 [B]) counts the valid user tokens of
each row; a row with ``kv_lengths == 0`` has no user history.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass
class UserContext:
    """Everything the LLM side needs about a batch of users, computed once per request.

    states:     [B, N, d_llm] projected user tokens (events, or Perceiver latents), right padded.
    kv_lengths: int64 [B], valid tokens per row (0 = no history).
    keys, values: one [B, N, Hkv, D] tensor per cross-attention block (the K/V cache of the user side),
        or None: then every block projects ``states`` itself at every call (the uncached reference path).
    copy_ids:   int64 [B, N], the token each user token writes through the readout's copy head (-1 = none),
        or None without one (:mod:`userllm.integration.copy_head`).
    """

    states: torch.Tensor
    kv_lengths: torch.Tensor
    keys: tuple[torch.Tensor, ...] | None = None
    values: tuple[torch.Tensor, ...] | None = None
    copy_ids: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.states.shape[0]

    @property
    def cached(self) -> bool:
        return self.keys is not None

    def _map(self, fn) -> "UserContext":
        return replace(
            self,
            states=fn(self.states),
            kv_lengths=fn(self.kv_lengths),
            keys=None if self.keys is None else tuple(fn(k) for k in self.keys),
            values=None if self.values is None else tuple(fn(v) for v in self.values),
            copy_ids=None if self.copy_ids is None else fn(self.copy_ids),
        )

    def without_history(self) -> "UserContext":
        """The same rows with no user tokens (``kv_lengths`` = 0): what the LLM says for anyone. The
        cross-attention blocks pass such rows' text through unchanged (zero attention output)."""
        return replace(self, kv_lengths=torch.zeros_like(self.kv_lengths))

    def index_select(self, idx: torch.Tensor) -> "UserContext":
        """Rows ``idx`` (int [B']) of every tensor, e.g. to follow a beam reordering."""
        idx = idx.to(self.states.device)
        return self._map(lambda t: t.index_select(0, idx))

    def repeat_interleave(self, n: int) -> "UserContext":
        """Each row repeated ``n`` times in place (row b -> rows b*n .. b*n+n-1), as HF expands for beams."""
        if n == 1:
            return self
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def to(self, *args, **kwargs) -> "UserContext":
        """Like ``Tensor.to``; dtype changes apply to the float tensors only."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            device = next((a for a in args if isinstance(a, (torch.device, str))), kwargs.get("device"))
            return t.to(device) if device is not None else t
        return self._map(move)


def lengths_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """int64 [B] valid counts of a right-padded bool mask [B, N] (True = real); rejects other layouts."""
    mask = mask.bool()
    lengths = mask.sum(dim=1)
    expected = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(mask, expected):
        raise ValueError("user encoder mask must be right padded (True for the first `length` positions)")
    return lengths.to(torch.int64)


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear, [..., d] -> [..., d]."""

    def __init__(self, d_model: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.up = nn.Linear(d_model, mult * d_model)
        self.act = nn.GELU()
        self.down = nn.Linear(mult * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.dropout(self.act(self.up(x))))


class UserProjection(nn.Module):
    """Two-layer MLP mapping user embeddings [B, N, d_enc] to the LLM width [B, N, d_llm]."""

    def __init__(self, d_enc: int, d_llm: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_enc, d_llm), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_llm, d_llm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def text_config(llm: nn.Module):
    config = getattr(llm, "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def llm_hidden_size(llm: nn.Module) -> int:
    """Width of the LLM's residual stream (``hidden_size``/``n_embd``; else the input embedding width)."""
    config = text_config(llm)
    size = getattr(config, "hidden_size", None) if config is not None else None
    if isinstance(size, int) and size > 0:
        return size
    return llm.get_input_embeddings().weight.shape[1]


def llm_num_heads(llm: nn.Module) -> int | None:
    config = text_config(llm)
    heads = getattr(config, "num_attention_heads", None) if config is not None else None
    return heads if isinstance(heads, int) and heads > 0 else None


def find_decoder_layers(llm: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` holding the LLM's decoder blocks, found by structure, and its module path.

    Candidates are module lists whose entries all have parameters: of one block type, or of several when
    the list is exactly the config's ``num_hidden_layers`` long (hybrid models such as Jamba interleave
    attention and Mamba blocks in one list). A list whose length equals ``num_hidden_layers`` wins;
    otherwise the outermost (not nested in another candidate, which rules out e.g. the experts of an MoE
    block), then the longest. Works for ``model.layers`` (Llama, Qwen2, Mistral, Gemma, Mixtral, Jamba),
    ``transformer.h`` (GPT-2), ``gpt_neox.layers`` (GPT-NeoX), ``backbone.layers`` (Mamba) without naming them.
    """
    config = text_config(llm)
    n_layers = getattr(config, "num_hidden_layers", None) if config is not None else None
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in llm.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not all(any(True for _ in m.parameters()) for m in module):
            continue
        if len({type(m) for m in module}) != 1 and len(module) != n_layers:
            continue
        candidates.append((name, module))
    if not candidates:
        raise ValueError(f"could not find the decoder layers of {type(llm).__name__}: no ModuleList of blocks")
    names = [n for n, _ in candidates]

    def nested(name: str) -> bool:
        return any(other != name and name.startswith(other + ".") for other in names)

    def rank(item: tuple[str, nn.ModuleList]):
        name, module = item
        return (len(module) == n_layers, not nested(name), len(module), -name.count("."))

    return max(candidates, key=rank)
