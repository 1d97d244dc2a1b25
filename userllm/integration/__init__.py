"""The LLM side of User-LLM: cross-attention / soft-prompt integration, Perceiver, training strategies.

Public API: :class:`UserLLM`, :class:`UserLLMConfig`, :class:`UserContext`, :func:`apply_strategy`, and the
TextPrompt baseline :class:`TextPromptModel` (the same strategies and checkpoints, no user side).

The names are resolved on first use (PEP 562), so that importing a light submodule such as
:mod:`userllm.integration.names` does not load transformers and peft.
"""

from importlib import import_module

from .names import INTEGRATIONS, STRATEGIES

_EXPORTS = {"TextPromptModel": "baseline", "GatedCrossAttentionBlock": "cross_attention",
            "UserContext": "layers", "find_decoder_layers": "layers", "UserLLM": "model",
            "UserLLMConfig": "model", "PerceiverResampler": "perceiver", "SoftPrompt": "soft_prompt",
            "apply_strategy": "strategies", "parameter_groups": "strategies"}

__all__ = sorted([*_EXPORTS, "INTEGRATIONS", "STRATEGIES"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
