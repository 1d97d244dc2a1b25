"""Sampling (and greedy decoding) constrained by one prefix trie per user.

The novelty LLM may only write the label of a cluster that is new for the user, and that set differs
from user to user, so each user gets its own :class:`~userllm.decoding.Trie` over the token ids of the
allowed labels (K is small: building one costs microseconds). The search drives the same ``step_fn``
interface as :func:`userllm.decoding.constrained_beam_search` (``HFStepper`` / ``UserLLMStepper``): the
prefill rows are expanded ``n`` times with ``beam_idx``, and every step masks the tokens the row's trie
does not allow after its prefix, then samples (temperature, nucleus top-p) or takes the argmax
(``temperature == 0``). Each sample ends at EOS on an allowed label, so every output is valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..decoding import StepFn, Trie


@dataclass
class SampleOutput:
    """entries: per prefill row, ``n`` trie values (the allowed label indices), in sampling order.
    steps: decoder calls after the prefill; fed_tokens: tokens fed to those calls over live rows
    (each a one-token forward of one row: the decode cost)."""

    entries: list[list[int]]
    steps: int
    fed_tokens: int


def user_trie(label_ids: Sequence[Sequence[int]], allowed: Sequence[int], eos_id: int) -> Trie:
    """A trie over ``label_ids[c]`` for ``c`` in ``allowed``; its values index ``allowed``."""
    return Trie([label_ids[c] for c in allowed], eos_id)


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits [R, V] with every token outside each row's top-p nucleus set to -inf (the most likely token
    always stays). ``top_p >= 1`` returns the input."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p                  # mass before this token already >= p
    drop[:, 0] = False
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


@torch.no_grad()
def constrained_sample(step_fn: StepFn, logits: torch.Tensor, past, tries: Sequence[Trie], num_samples: int,
                       temperature: float = 1.0, top_p: float = 1.0,
                       generator: torch.Generator | None = None) -> SampleOutput:
    """``num_samples`` labels per prefill row, each sampled token by token inside that row's trie.

    logits: float [B, V] after each prompt (the prefill), past: the prefill state, tries: B tries.
    Rows are laid out b * n + j; row r of every step's state is row ``beam_idx[r]`` of the previous one.
    """
    B, V = logits.shape
    if len(tries) != B:
        raise ValueError(f"constrained_sample: {len(tries)} tries for {B} prompts")
    if any(t.size == 0 for t in tries):
        raise ValueError("constrained_sample: a row has no allowed entry")
    n = int(num_samples)
    device = logits.device
    R = B * n
    row_trie = [tries[r // n] for r in range(R)]
    nodes = [0] * R
    out: list[int | None] = [None] * R
    beam_idx = torch.arange(B, device=device).repeat_interleave(n)
    step_logits = logits.index_select(0, beam_idx)
    steps = fed = 0
    max_len = max(t.max_len for t in tries)
    for _ in range(max_len):
        rows, cols = [], []
        for r, node in enumerate(nodes):
            kids = row_trie[r].children[node] if out[r] is None else {row_trie[r].eos_id: 0}
            rows.extend([r] * len(kids))
            cols.extend(kids)
        allowed = torch.zeros(R, V, dtype=torch.bool, device=device)
        allowed[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = True
        masked = step_logits.float().masked_fill(~allowed, float("-inf"))
        if temperature <= 0:
            tok = masked.argmax(-1)
        else:
            probs = nucleus(masked / temperature, top_p).softmax(-1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        toks = tok.tolist()
        for r, t in enumerate(toks):
            if out[r] is not None:
                continue
            child = row_trie[r].children[nodes[r]][t]
            nodes[r] = child
            if t == row_trie[r].eos_id:
                out[r] = row_trie[r].value[child]
        live = sum(v is None for v in out)
        if live == 0:
            break
        beam_idx = torch.arange(R, device=device) if steps else beam_idx
        step_logits, past = step_fn(tok.view(R, 1).to(device), past, beam_idx)
        steps += 1
        fed += live
    entries = [[int(out[b * n + j]) for j in range(n)] for b in range(B)]
    return SampleOutput(entries, steps, fed)
