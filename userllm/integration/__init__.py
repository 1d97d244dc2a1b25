"""The LLM side of User-LLM: cross-attention / soft-prompt integration, Perceiver, training strategies.

Public API: :class:`UserLLM`, :class:`UserLLMConfig`, :class:`UserContext`, :func:`apply_strategy`, and the
TextPrompt baseline :class:`TextPromptModel` (the same strategies and checkpoints, no user side).
"""

from .baseline import TextPromptModel
from .cross_attention import GatedCrossAttentionBlock
from .layers import UserContext, find_decoder_layers
from .model import UserLLM, UserLLMConfig
from .perceiver import PerceiverResampler
from .soft_prompt import SoftPrompt
from .strategies import STRATEGIES, apply_strategy, parameter_groups

__all__ = ["UserLLM", "UserLLMConfig", "TextPromptModel", "UserContext", "GatedCrossAttentionBlock", "PerceiverResampler",
           "SoftPrompt", "apply_strategy", "parameter_groups", "find_decoder_layers", "STRATEGIES"]
