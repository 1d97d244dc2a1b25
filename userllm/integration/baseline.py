"""The TextPrompt baseline as a model beside :class:`~userllm.integration.UserLLM`.

The plain LLM with the history rendered as text in its prompt (:class:`~userllm.llm_data.LLMBatcher`
with ``text_events=None``) and no user encoder. It has the UserLLM's interface where the two meet (``llm``,
``encoder`` (None), ``forward(input_ids, attention_mask, labels)``, ``generate``, ``num_prefix_tokens``), so
the training strategies (:func:`~userllm.integration.apply_strategy`: ``full`` or ``lora``, one LoRA
injection for both models), the checkpoints and the evaluation treat both alike.
"""

from __future__ import annotations

import torch
from torch import nn

from userllm.utils.hf import forward_with_target_loss


class TextPromptModel(nn.Module):
    """The TextPrompt baseline: ``llm`` (a Hugging Face causal LM) reading the history as text."""

    encoder = None

    def __init__(self, llm: nn.Module):
        super().__init__()
        self.llm = llm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs):
        return forward_with_target_loss(self.llm, labels, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs):
        """The LLM's Hugging Face ``generate``."""
        return self.llm.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)

    def num_prefix_tokens(self, n_events: int) -> int:
        """LLM context tokens the user side adds: none (the history is in the prompt text)."""
        return 0
