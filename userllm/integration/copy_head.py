"""A pointer (copy) head over the readout's title tokens (``--readout-pointer``; issue 14).

Why: with the readout's title tokens (``--readout-title-tokens P``) the LLM learns to write a candidate's
title through its cross-attention, but on ml-latest-small it copied at 1.0-1.4 nats per title token at
best (README "Session 9"). A title is ~10 tokens, so a candidate paid 10-14 nats, and the exact top 10
titles were mostly short ones the LLM writes for anyone: the exact Recall@10 rose as that copy loss fell
(0.0098 at 2.4 nats, 0.021-0.034 at 1.0-1.4) and stayed below the encoder's own 0.059.

A pointer-generator output (See et al., 2017, "Get To The Point") gives the copy its own path. At text
position t, with h_t the hidden state the LLM's output head reads (after its final norm):

    a_t = softmax_n( (W_q h_t) . (W_k s_n) / sqrt(d_k) )       over the row's copyable user tokens s_n
    g_t = sigmoid(w_g . h_t + b_g)
    p(v | h_t) = (1 - g_t) softmax(lm_head(h_t))_v + g_t * sum_n a_t,n [id_n = v]

A copyable user token is one of the readout's title tokens: candidate k's token j carries ``id_n`` = the
j-th token of k's answer (its title, then EOS), so pointing at it writes that token. The token also holds
the title token before it (``NextItemReadout``), so a query that holds the token just written finds
what follows it in a candidate's title. The LLM still writes the title token by token (the paper's
formulation); the head only lets it write a token it reads, as a pointer-generator does.

Measured on ml-latest-small (README "Session 10", 3 seeds, all 610 test users): the copy loss fell from 1.19
to 0.345 nats per token and the exact Recall@10 rose from 0.0290 to 0.0590, the encoder's own. The price
is calibration: trained on candidate labels only, the gate learns g ~ 1 and titles outside the candidates
lose nearly all probability (test loss 11.3 nats per token).

:class:`CopyHook` attaches the head to the LLM's output embedding (``lm_head``) as a forward hook, so
every path that computes logits sees the mixture: the training loss, teacher-forced scores, beams,
the exact search and HF ``generate``. It returns log p, which are valid logits (``log_softmax`` leaves
them unchanged). Rows without copyable tokens (no readout, or ``kv_lengths`` = 0: no history) get the
LLM's own log-probabilities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# A copy probability is floored here inside the log, so that a token no copyable token writes costs a
# finite log (not -inf: its gradient would be 0 * inf = NaN); e^-69 is far below any probability used.
COPY_FLOOR = 1e-30


class CopyHead(nn.Module):
    """Pointer over copyable user tokens, mixed into the LLM's next-token distribution (module docstring).

    d_model: the width of both the hidden states the output head reads and the user tokens; d_key: the
    pointer's query/key width (default d_model). The gate starts at sigmoid(0) = 0.5.
    """

    def __init__(self, d_model: int, d_key: int | None = None):
        super().__init__()
        d_key = d_key or d_model
        self.query = nn.Linear(d_model, d_key, bias=False)
        self.key = nn.Linear(d_model, d_key, bias=False)
        self.gate = nn.Linear(d_model, 1)
        with torch.no_grad():
            self.gate.weight.zero_()
            self.gate.bias.zero_()

    def forward(self, hidden: torch.Tensor, logits: torch.Tensor, states: torch.Tensor, ids: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        """hidden float [B, T, d_model]: what the output head read; logits float [B, T, V]: what it wrote;
        states float [B, N, d_model]: the user tokens; ids int64 [B, N]: the token each one writes (-1 = not
        copyable); lengths int64 [B]: valid user tokens per row. Returns [B, T, V] log-probabilities in float32
        (float64 for float64 logits): the LLM's own log_softmax(logits) in rows with no copyable token."""
        own, log_copy, z, copyable = self.parts(hidden, logits, states, ids, lengths)
        return torch.where(copyable[:, None, None], mix(own, log_copy, z), own)

    def parts(self, hidden: torch.Tensor, logits: torch.Tensor, states: torch.Tensor, ids: torch.Tensor,
              lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mixture's parts, for :meth:`forward` (same arguments) and the gate's calibration
        (:mod:`userllm.calibration`): the LLM's own log-probs [B, T, V], the pointer's log-probs [B, T, V]
        (floored at ``COPY_FLOOR``), the gate's logit z [B, T, 1] (g = sigmoid(z)), and bool [B]: rows
        with a copyable token (the others keep their own log-probs)."""
        B, T, V = logits.shape
        N = states.shape[1]
        if ids.shape != (B, N) or hidden.shape[:2] != (B, T):
            raise ValueError(f"copy head: hidden {tuple(hidden.shape)}, logits {tuple(logits.shape)}, states "
                             f"{tuple(states.shape)} and ids {tuple(ids.shape)} disagree")
        dtype = torch.promote_types(logits.dtype, torch.float32)       # float32, or float64 in gradcheck
        own = torch.log_softmax(logits.to(dtype), dim=-1)
        lengths = lengths.to(ids.device)
        valid = (ids >= 0) & (torch.arange(N, device=ids.device)[None] < lengths[:, None])       # [B, N]
        h = hidden.to(self.query.weight.dtype)
        q = self.query(h)                                                                          # [B, T, dk]
        k = self.key(states.to(self.key.weight.dtype))                                             # [B, N, dk]
        scores = torch.einsum("btd,bnd->btn", q, k).to(dtype) / math.sqrt(q.shape[-1])
        # A finite fill, not -inf: a row with nothing to copy gets a harmless uniform here, zeroed below.
        scores = scores.masked_fill(~valid[:, None], torch.finfo(scores.dtype).min)
        attn = torch.softmax(scores, dim=-1) * valid[:, None]
        index = ids.clamp_min(0).to(logits.device)[:, None].expand(B, T, N)
        p_copy = own.new_zeros(B, T, V).scatter_add_(2, index, attn)
        z = self.gate(h).to(dtype)                                                                 # [B, T, 1]
        return own, p_copy.clamp_min(COPY_FLOOR).log(), z, valid.any(1)


def mix(own: torch.Tensor, log_copy: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log((1 - g) exp(own) + g exp(log_copy)) with g = sigmoid(z), stably; any broadcastable shapes."""
    return torch.logaddexp(F.logsigmoid(-z) + own, F.logsigmoid(z) + log_copy)


class CopyHook:
    """Forward hook on the LLM's output embedding: replaces its logits by the copy mixture's log-probs.

    ``owner`` provides ``context_for_batch(B) -> UserContext | None``; a context without ``copy_ids`` (or
    none: plain LLM use) leaves the logits untouched. ``head``: the :class:`CopyHead` to apply.
    """

    def __init__(self, owner: nn.Module, head: CopyHead):
        self.owner, self.head = owner, head

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor):
        hidden = args[0]
        context = self.owner.context_for_batch(hidden.shape[0])
        if context is None or context.copy_ids is None:
            return None
        return self.head(hidden, output, context.states, context.copy_ids, context.kv_lengths)
