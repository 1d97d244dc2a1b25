"""Soft-prompt integration: [user tokens ; learned task prompt ; text] as the LLM's input embeddings.

Layout of one row (``N`` user slots, ``P`` task-prompt tokens):

    [pad .. pad, user_1 .. user_len, task_1 .. task_P, text ...]

The user tokens are left aligned against the task prompt, so padding sits at the start exactly like
left-padded prompts in generation. The attention mask marks the padding, position ids count only real
tokens (``cumsum(mask) - 1``, what Hugging Face ``generate`` derives from the mask too), and labels are
-100 on the whole prefix.
"""

from __future__ import annotations

import torch
from torch import nn


class SoftPrompt(nn.Module):
    """Learned task prompt [P, d] and the assembly of the prefix."""

    def __init__(self, d_model: int, task_prompt_len: int, init_std: float = 0.02):
        super().__init__()
        if task_prompt_len < 0:
            raise ValueError(f"task prompt length must be >= 0, got {task_prompt_len}")
        self.task_prompt = nn.Parameter(torch.randn(task_prompt_len, d_model) * init_std)

    def build_prefix(self, states: torch.Tensor | None, lengths: torch.Tensor | None,
                     batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """states [B, N, d] right padded with ``lengths`` int [B] (or None: no user side).

        Returns the prefix [B, N + P, d] (user tokens moved to the right end of their N slots, zeros in
        the freed slots) and its attention mask int64 [B, N + P].
        """
        P, d = self.task_prompt.shape
        device = self.task_prompt.device
        if states is None:
            prefix = self.task_prompt.unsqueeze(0).expand(batch_size, P, d)
            return prefix, torch.ones(batch_size, P, dtype=torch.int64, device=device)
        B, N, _ = states.shape
        # Slot j of row b holds user token j - (N - len_b): a gather that right-aligns each row.
        src = torch.arange(N, device=states.device)[None, :] - (N - lengths.to(states.device))[:, None]
        valid = src >= 0
        gathered = states.gather(1, src.clamp_min(0)[:, :, None].expand(B, N, d))
        user = torch.where(valid[:, :, None], gathered, torch.zeros_like(gathered))
        task = self.task_prompt.to(states.dtype).unsqueeze(0).expand(B, P, d)
        return torch.cat([user, task], dim=1), self.prefix_mask(lengths, N, B)

    def prefix_mask(self, lengths: torch.Tensor | None, n_slots: int, batch_size: int) -> torch.Tensor:
        """The int64 [B, n_slots + P] attention mask of :meth:`build_prefix` alone (for decoding steps,
        where the prefix itself is already in the KV cache)."""
        P = self.task_prompt.shape[0]
        device = self.task_prompt.device if lengths is None else lengths.device
        task = torch.ones(batch_size, P, dtype=torch.int64, device=device)
        if lengths is None:
            return task
        slots = torch.arange(n_slots, device=device)[None, :]
        return torch.cat([(slots >= n_slots - lengths[:, None]).to(torch.int64), task], dim=1)


def prepend(prefix: torch.Tensor, prefix_mask: torch.Tensor, embeds: torch.Tensor,
            attention_mask: torch.Tensor | None, labels: torch.Tensor | None = None):
    """Concatenate a prefix [B, S, d] before text embeddings [B, T, d].

    Returns (inputs_embeds [B, S+T, d], attention_mask int64 [B, S+T], labels [B, S+T] or None,
    position_ids int64 [B, S+T]).
    """
    B, T, _ = embeds.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.int64, device=embeds.device)
    mask = torch.cat([prefix_mask.to(attention_mask.device), attention_mask.to(torch.int64)], dim=1)
    inputs = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
    if labels is not None:
        ignore = torch.full(prefix_mask.shape, -100, dtype=labels.dtype, device=labels.device)
        labels = torch.cat([ignore, labels], dim=1)
    return inputs, mask, labels, position_ids_from_mask(mask)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only; padding gets 0 (as in ``generate``)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
