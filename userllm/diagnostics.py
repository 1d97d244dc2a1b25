"""Does the LLM use the user? Measurements reported by every User-LLM evaluation (issue 14).

* **Context gain** (:func:`context_gain`): the teacher-forced target loss (nats per target token, the
  ``loss`` column of the results table) of the evaluation examples

  - with each user's own history (``own``),
  - with the histories shuffled across users: example ``i`` keeps its prompt and target but its encoder
    input is the window of example ``partner[i]``, a fixed derangement (no example keeps its own),
  - with no history: the user context's ``kv_lengths`` set to 0 (cross-attention blocks pass the text
    through; the soft prompt masks the user tokens).

  ``context_gain`` = shuffled - own is what the model takes from *this* user; ``context_gain_none`` =
  none - own also counts what any history tells it (e.g. that the answer is a film title a user rated,
  a generic prior). A model that ignores the user has ``context_gain`` ~ 0 however low its loss: on
  ml-latest-small the issue measured 0.009 nats with a frozen LLM and exactly 0 with a trainable one.
  Only the encoder input is shuffled; with a mixed context (``--text-events n``) the rendered text stays
  the user's own, so the gain is what the embeddings add on top of the text.

* **Readout copy gain** (:func:`readout_copy_gain`, models with ``--readout-tokens``): each example's label
  is replaced by a random item, and its title's target loss is taken with that item swapped into the
  readout's top-1 place and without it among the candidates; the difference says whether the LLM writes
  what the readout tokens name (0 = it does not read them).

* **Gates** (:func:`gate_values`): tanh of each cross-attention block's attention and FFN gate, the
  scale at which the block writes into the residual stream (0 = the block is shut).

* **Encoder's own ranking** (:func:`encoder_recall`): for NextItem, Recall@k of the user encoder's tied
  next-item head (full ranking over all items) on the same users and windows, i.e. what the LLM could
  read. After co-training (strategies full/lora/enc) it also shows how far the encoder drifted.

* **Catalogue likelihood ranking** (:func:`catalogue_likelihood_recall`): Recall@k when every catalogue
  entry is scored by its sequence log-likelihood under the model (the exhaustive ranking that the
  constrained beam search approximates); expensive (one forward over the whole catalogue per user), so a
  tool for a few users, not part of every evaluation.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .data.examples import Examples, collate
from .metrics import KS, label_ranks, metrics_from_ranks

# Seed of the across-user shuffle: fixed (not the run's seed) so that runs are compared on the same pairs.
SHUFFLE_SEED = 4321
CONTEXTS = ("own", "shuffled", "none")


def derangement(n: int, seed: int = SHUFFLE_SEED) -> np.ndarray:
    """int64 [n]: ``partner[i] != i`` for every i when n >= 2 (a random cyclic order, each one -> the next)."""
    order = np.random.default_rng(seed).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    return partner


def _is_user_llm(model) -> bool:
    return hasattr(model, "prepare_user_context")


@torch.no_grad()
def target_loss_sums(model, batcher, ds, examples: Examples, context: str, *, batch_size: int = 32,
                     device: torch.device | str = "cpu", amp: Callable = contextlib.nullcontext,
                     partner: np.ndarray | None = None, swap_items: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per-example summed target-token cross-entropy (float64 [N], nats) and target-token counts (int64 [N]).

    model: a :class:`~userllm.integration.UserLLM` in eval mode; context: ``own`` | ``shuffled`` | ``none``
    (module docstring); partner: the shuffle (default :func:`derangement` of N); swap_items: int64 [N] items
    put in the readout's top-1 place, one per example (:meth:`NextItemReadout.candidates_replaced`).
    """
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    n = len(examples)
    if context == "shuffled" and partner is None:
        partner = derangement(n)
    sums, counts = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.int64)
    for a in range(0, n, batch_size):
        idx = np.arange(a, min(a + batch_size, n))
        lb = batcher.train_batch(collate(ds, examples, idx)).to(device)
        events = lb.events if context != "shuffled" else collate(ds, examples, partner[idx]).to(device)
        swap = (contextlib.nullcontext() if swap_items is None
                else model.readout.candidates_replaced(torch.as_tensor(swap_items[idx, None], device=device)))
        with amp(), swap:
            ctx = model.prepare_user_context(events.features, events.lengths, cache_kv=False)
            if context == "none":
                ctx = ctx.without_history()
            logits = model(input_ids=lb.input_ids, attention_mask=lb.attention_mask, user_context=ctx).logits
        shift_logits, shift_labels = logits[:, :-1].float(), lb.labels[:, 1:]
        ce = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
        sums[idx] = ce.sum(1).double().cpu().numpy()
        counts[idx] = (shift_labels != -100).sum(1).cpu().numpy()
    return sums, counts


def context_gain(model, batcher, ds, examples: Examples, *, batch_size: int = 32,
                 device: torch.device | str = "cpu", amp: Callable = contextlib.nullcontext) -> dict | None:
    """{"loss_own", "loss_shuffled", "loss_none", "context_gain", "context_gain_none"} in nats per target
    token (module docstring); None for a model without a user encoder (TextPrompt) or fewer than 2 examples."""
    if not _is_user_llm(model) or len(examples) < 2:
        return None
    losses = {}
    for context in CONTEXTS:
        sums, counts = target_loss_sums(model, batcher, ds, examples, context, batch_size=batch_size,
                                        device=device, amp=amp)
        losses[context] = float(sums.sum() / max(int(counts.sum()), 1))
    return {"loss_own": losses["own"], "loss_shuffled": losses["shuffled"], "loss_none": losses["none"],
            "context_gain": losses["shuffled"] - losses["own"], "context_gain_none": losses["none"] - losses["own"]}


def readout_copy_gain(model, batcher, ds, examples: Examples, *, batch_size: int = 32,
                      device: torch.device | str = "cpu", amp: Callable = contextlib.nullcontext,
                      seed: int = SHUFFLE_SEED) -> dict | None:
    """{"loss_swapped_in", "loss_absent", "copy_gain"} in nats per target token (module docstring), on
    ``examples`` relabelled with items drawn uniformly (fixed ``seed``); None without readout tokens or
    examples."""
    readout = getattr(model, "readout", None)
    if readout is None or len(examples) == 0:
        return None
    items = np.random.default_rng(seed).integers(1, readout.num_items, len(examples))
    relabelled = replace(examples, labels=items)
    loss = {}
    for name, swap in (("swapped_in", items), ("absent", None)):
        sums, counts = target_loss_sums(model, batcher, ds, relabelled, "own", batch_size=batch_size,
                                        device=device, amp=amp, swap_items=swap)
        loss[name] = float(sums.sum() / max(int(counts.sum()), 1))
    return {"loss_swapped_in": loss["swapped_in"], "loss_absent": loss["absent"],
            "copy_gain": loss["absent"] - loss["swapped_in"]}


def gate_values(model) -> dict | None:
    """{"attn": [tanh(gate)...], "ffn": [...]} per cross-attention block, in layer order; None without blocks."""
    blocks = getattr(model, "xattn", None)
    if not blocks:
        return None
    return {"attn": [round(float(torch.tanh(b.attn_gate.detach().float()).item()), 6) for b in blocks],
            "ffn": [round(float(torch.tanh(b.ffn_gate.detach().float()).item()), 6) for b in blocks]}


@torch.no_grad()
def encoder_recall(model, ds, examples: Examples, *, batch_size: int = 256,
                   device: torch.device | str = "cpu") -> dict | None:
    """Recall@1/5/10 (+ NDCG@10) of ``model.encoder``'s next-item head over all items, on ``examples``' windows.

    Examples whose target is UNK are left out (an unknown item cannot be ranked). None when the model has
    no encoder with a ``score_next`` head or the task is not NextItem.
    """
    encoder = getattr(model, "encoder", None)
    if examples.task != "nextitem" or encoder is None or not hasattr(encoder, "score_next"):
        return None
    keep = np.flatnonzero(examples.labels > 0)
    was_training = encoder.training
    encoder.eval()
    ranks = []
    try:
        for a in range(0, len(keep), batch_size):
            batch = collate(ds, examples, keep[a:a + batch_size]).to(device)
            scores = encoder.score_next(batch.features, batch.lengths)
            ranks.append(label_ranks(scores.float().cpu(), batch.labels.cpu()))
    finally:
        encoder.train(was_training)
    if not ranks:
        return None
    return metrics_from_ranks(torch.cat(ranks), KS)


@torch.no_grad()
def catalogue_log_likelihoods(model, batcher, ds, examples: Examples, *, chunk: int = 2048,
                              device: torch.device | str = "cpu", amp: Callable = contextlib.nullcontext,
                              no_history: bool = False) -> torch.Tensor:
    """float32 [N, E]: log p(entry + EOS | prompt, user) of every catalogue entry for every example.

    The same score the constrained beam search maximises (summed token log-probabilities, teacher
    forced), computed exhaustively: per example, the prompt + each entry in chunks of ``chunk`` rows,
    the user context computed once and repeated over the chunk. ``no_history``: with the user context
    emptied (``kv_lengths`` = 0), i.e. log p(entry | no history).
    """
    cat = batcher.catalogue
    if cat is None:
        raise ValueError(f"task {batcher.task!r} has no catalogue to rank")
    tok = batcher.tok
    entries = batcher._targets(cat.entries)
    eos = tok.eos_token_id
    out = torch.empty(len(examples), len(entries))
    user_llm = _is_user_llm(model)
    for i in range(len(examples)):
        pb = batcher.prompt_batch(collate(ds, examples, np.array([i]))).to(device)
        prompt = pb.input_ids[0, pb.attention_mask[0].bool()].tolist()
        with amp():
            ctx = (model.prepare_user_context(pb.events.features, pb.events.lengths, cache_kv=True)
                   if user_llm else None)
            if no_history and ctx is not None:
                ctx = ctx.without_history()
            for a in range(0, len(entries), chunk):
                seqs = [prompt + e + [eos] for e in entries[a:a + chunk]]
                T = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), T), tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(seqs), T), dtype=torch.long)
                for r, s in enumerate(seqs):
                    ids[r, :len(s)] = torch.tensor(s)
                    mask[r, :len(s)] = 1
                ids, mask = ids.to(device), mask.to(device)
                if user_llm:
                    logits = model(input_ids=ids, attention_mask=mask,
                                   user_context=ctx.repeat_interleave(len(seqs))).logits
                else:
                    logits = model.llm(input_ids=ids, attention_mask=mask).logits
                logp = torch.log_softmax(logits[:, len(prompt) - 1:-1].float(), dim=-1)
                tgt = ids[:, len(prompt):]
                tok_logp = logp.gather(2, tgt[..., None])[..., 0] * mask[:, len(prompt):]
                out[i, a:a + len(seqs)] = tok_logp.sum(1).cpu()
    return out


def catalogue_likelihood_recall(model, batcher, ds, examples: Examples, prior_weight: float = 0.0,
                                **kwargs) -> dict:
    """Recall@1/5/10 of the exhaustive likelihood ranking (:func:`catalogue_log_likelihoods`) over the
    catalogue entries; examples whose answer has no entry are left out. ``prior_weight`` W > 0 ranks by
    log p(entry | user) - W log p(entry | no history), the score of
    :class:`~userllm.decoding.ContrastiveStepper`."""
    labels = torch.from_numpy(batcher.catalogue.label_to_entry[examples.labels])
    keep = np.flatnonzero(labels.numpy() >= 0)
    scores = catalogue_log_likelihoods(model, batcher, ds, examples.subset(keep), **kwargs)
    if prior_weight:
        scores = scores - prior_weight * catalogue_log_likelihoods(model, batcher, ds, examples.subset(keep),
                                                                   no_history=True, **kwargs)
    # label_ranks treats column 0 as UNK: shift the entries by one column.
    padded = torch.cat([torch.full((len(keep), 1), float("-inf")), scores], dim=1)
    return metrics_from_ranks(label_ranks(padded, labels[keep] + 1), KS)


def user_signal(model, batcher, ds, examples: Examples, *, batch_size: int = 32,
                device: torch.device | str = "cpu", amp: Callable = contextlib.nullcontext) -> dict:
    """What an evaluation records about the user signal: context gain and gates (keys absent when n/a)."""
    out: dict = {}
    gain = context_gain(model, batcher, ds, examples, batch_size=batch_size, device=device, amp=amp)
    if gain is not None:
        out.update(gain)
    copy = readout_copy_gain(model, batcher, ds, examples, batch_size=batch_size, device=device, amp=amp)
    if copy is not None:
        out["readout_copy"] = copy
    gates = gate_values(model)
    if gates is not None:
        out["gates"] = gates
    return out
