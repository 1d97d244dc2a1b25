"""Hugging Face transformers differences across the supported versions (5.17 .. 5.24), in one place.

The decoding cache: up to 5.17 a causal LM's ``forward`` takes it as ``past_key_values`` (Mamba-style
recurrent models: ``cache_params``) and returns it under that name; later 5.x releases renamed both to
``cache`` and keep the old names as deprecated aliases (a ``FutureWarning`` on every call, removed in
5.40). The name is read from the model's own ``forward`` signature, so the same code drives any
version and any model family, including remote-code models that still use the old names.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Current name first: a forward that takes several (none known today) gets the current one.
CACHE_NAMES = ("cache", "past_key_values", "cache_params")
# The label that Hugging Face's causal-LM losses and torch's cross_entropy skip (prompt and padding tokens).
IGNORE = -100


@functools.lru_cache(maxsize=None)
def _forward_cache_name(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters  # follows the @deprecate_kwarg wrapper's __wrapped__
    return next((name for name in CACHE_NAMES if name in params), "past_key_values")


def cache_kwarg(model: nn.Module) -> str:
    """The keyword under which ``model.forward`` takes its decoding cache (see the module docstring)."""
    return _forward_cache_name(type(model))


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` to pass to ``model(...)``, or ``{}`` when ``cache`` is None."""
    return {} if cache is None else {cache_kwarg(model): cache}


def output_cache(out: Any) -> Any:
    """The cache an HF model output carries (``cache`` / ``past_key_values`` / ``cache_params``), or None.

    Read by key, not attribute: the old attribute names are deprecated properties that warn on access.
    """
    for name in CACHE_NAMES:
        value = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if value is not None:
            return value
    return None


def new_cache(model: nn.Module):
    """An empty ``DynamicCache`` laid out for ``model``: built from its (text) config, so recurrent and
    hybrid models (Mamba, Jamba) get their state layers, not attention-only ones."""
    from transformers import DynamicCache

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return DynamicCache(config=config)


def cached_tokens(cache) -> int | None:
    """Tokens an HF ``Cache`` holds (its attention layers' length), or None for a purely recurrent cache
    (Mamba: convolution and SSM states only), which does not count them."""
    if any(_is_attention_layer(layer) for layer in getattr(cache, "layers", ())) or not getattr(cache, "layers", None):
        return cache.get_seq_length()
    return None


def is_empty(cache) -> bool:
    """Whether nothing has been run through ``cache`` yet (attention or recurrent layers alike)."""
    n = cached_tokens(cache)
    return n == 0 if n is not None else not cache.has_previous_state()


def step_mask(cache, mask):
    """The attention mask to hand an HF model together with ``cache``.

    Attention models take the mask of past + new tokens. A purely recurrent model (Mamba) reads its mask
    as one entry per *new* token (it zeroes padded inputs), so once its state holds the prompt it gets
    none, as HF's own ``generate`` does (``MambaForCausalLM.prepare_inputs_for_generation``).
    """
    if cache is not None and cached_tokens(cache) is None and not is_empty(cache):
        return None
    return mask


def _is_attention_layer(layer) -> bool:
    from transformers.cache_utils import CacheLayerMixin

    return isinstance(layer, CacheLayerMixin)


def enable_activation_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Turn on HF activation (gradient) checkpointing of ``model``'s decoder layers: the method is
    ``activation_checkpointing_enable`` in newer transformers (5.24; ``gradient_checkpointing_enable`` is its
    deprecated alias there) and ``gradient_checkpointing_enable`` in older ones (5.17 has only that)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


@functools.lru_cache(maxsize=None)
def _keeps_logits(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def keeps_logits(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (the output head on the last positions only)."""
    return _keeps_logits(type(model))


def first_target(labels: torch.Tensor) -> int | None:
    """The first column of ``labels`` (int64 [B, T]) holding a target in any row, or None (one host sync)."""
    cols = (labels != IGNORE).any(0).nonzero()
    return int(cols[0]) if len(cols) else None


def kept_positions(seq_len: int, first: int | None) -> int:
    """How many last positions of a ``seq_len``-token sequence the output head must cover when the first
    target is at column ``first`` (None: no target, all): the one before it on, at most all, at least 1."""
    return seq_len if first is None else min(seq_len, max(1, seq_len - first + 1))


def forward_with_target_loss(model: nn.Module, labels: torch.Tensor | None, **kwargs: Any):
    """``model(**kwargs)`` with the causal-LM loss of ``labels`` (int64 [B, T], :data:`IGNORE` outside the
    targets; the label at t is predicted from position t - 1), computing the output head only from the
    first target column on, when the model's ``forward`` takes ``logits_to_keep`` (Llama, Mistral, Qwen,
    Gemma, ... in transformers 5.x); others get ``labels`` and compute their loss as before. ``labels``
    None: the plain forward (every position's logits, no loss).

    Why: the head and its log-softmax over the vocabulary were ~14% of a training step of the main job
    (2 layers, width 128, 992 tokens, B 64 x T 21), and the NextItem prompt precedes the title. The loss
    is HF's: the float32 cross-entropy averaged over the target tokens. Returns the model's output with
    ``loss`` set and ``logits`` of the last K positions only ([B, K, V]; K = T - first target column + 1).
    """
    if labels is None:
        return model(**kwargs)
    T = labels.shape[1]
    if not keeps_logits(model) or T < 2:
        return model(labels=labels, **kwargs)
    keep = kept_positions(T, first_target(labels))                # one host sync per training step
    out = model(logits_to_keep=keep, **kwargs)
    logits = out.logits                                            # [B, keep, V]: positions T - keep .. T - 1
    shifted = F.pad(labels[:, T - keep + 1:], (0, 1), value=IGNORE)  # the label each kept position predicts
    out.loss = F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten().to(logits.device),
                               ignore_index=IGNORE)
    return out
