"""The two LLMs of the exploration system, both :class:`~userllm.integration.UserLLM` s (the user's
window of events enters through gated cross-attention) with the recent clusters also written as text.

* **Novelty LLM**: ``"Recent interests: A; B; C.\\nNext new interest:"`` -> ``" <label>"`` of the novel
  cluster the user went to; trained with the causal-LM loss on the label tokens (+ EOS). At inference
  :meth:`NoveltyLLM.sample` draws labels of clusters new for the user (:mod:`.sampling`).
* **User-aligned LLM**: ``"Recent interests: ...\\nNew interest: <label>.\\nWill the user like it?\\nAnswer:"``
  -> ``" yes"`` / ``" no"``. Its score is ``logit(yes) - logit(no)`` at the answer position (the first
  token of each word), trained with the two-way cross-entropy over those two logits. Examples: every
  observed novel transition of the training users (yes when its feedback is positive, else no) plus
  ``negatives`` other clusters new for that user that it did not go to (no): what the user went to and
  liked should outscore what it did not go to at all, and what it went to but disliked. The negatives are
  drawn in proportion to the clusters' popularity as targets by default: with uniform negatives (the first
  ml-latest-small run, README) the aligned LLM learnt mostly popularity, and picking by it collapsed the
  chosen clusters onto the popular ones (6 distinct clusters over 171 users when ranking all, against
  17 for the novelty LLM's samples).

Cost accounting (what the evaluation reports per user): a *forward pass* is one row through the LLM,
a prefill of the whole prompt or one decoding step; *tokens* are the token positions fed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.examples import gather_windows
from ..data.loader import EpochBatchSampler
from ..decoding import UserLLMStepper, left_pad
from ..text_prompt import target_text
from ..loop import cosine_with_warmup, optimizer_step, progress
from .clusters import recent_clusters
from .sampling import constrained_sample, user_trie

IGNORE = -100
YES, NO = "yes", "no"


@dataclass
class Contexts:
    """Users' states at some event rows: the window rows ``[start, row)`` and the recent clusters.

    row, start: int64 [n]; recent: n lists of cluster ids (distinct, oldest first).
    """

    row: np.ndarray
    start: np.ndarray
    recent: list[list[int]]

    def __len__(self) -> int:
        return len(self.row)

    def take(self, idx) -> "Contexts":
        idx = np.asarray(idx, dtype=np.int64)
        return Contexts(self.row[idx], self.start[idx], [self.recent[i] for i in idx.tolist()])


def contexts_at(ds, event_cluster: np.ndarray, rows: np.ndarray, window: int) -> Contexts:
    """The :class:`Contexts` before each sorted-event row (the window never crosses a user boundary:
    callers pass rows with a full window of the same user before them)."""
    rows = np.asarray(rows, dtype=np.int64)
    return Contexts(rows, rows - window, [recent_clusters(event_cluster, int(r), window) for r in rows])


class Prompts:
    """The prompt texts and label token ids (shared by both LLMs).

    labels: the K cluster labels; tok: the tokenizer; max_clusters: recent clusters written (0 = all).
    """

    def __init__(self, labels: Sequence[str], tok, max_clusters: int = 0):
        self.labels, self.tok, self.max_clusters = list(labels), tok, max_clusters
        self.label_ids = self.encode([target_text(lab) for lab in self.labels])
        if len({tuple(x) for x in self.label_ids}) != len(self.labels):
            raise ValueError("two cluster labels have the same tokens")
        yes, no = self.encode([target_text(YES), target_text(NO)])
        if yes[0] == no[0]:
            raise ValueError(f"the tokenizer starts {YES!r} and {NO!r} with the same token")
        self.yes_id, self.no_id = yes[0], no[0]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def history(self, recent: Sequence[int]) -> str:
        shown = list(recent)[-self.max_clusters:] if self.max_clusters else list(recent)
        return "Recent interests: " + "; ".join(self.labels[c] for c in shown) + "."

    def novelty(self, recent: Sequence[int]) -> str:
        return f"{self.history(recent)}\nNext new interest:"

    def aligned(self, recent: Sequence[int], candidate: int) -> str:
        return f"{self.history(recent)}\nNew interest: {self.labels[candidate]}.\nWill the user like it?\nAnswer:"

    def with_bos(self, texts: Sequence[str]) -> list[list[int]]:
        return [[self.tok.bos_token_id] + ids for ids in self.encode(texts)]


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, labels_from: Sequence[int] | None = None):
    """(input_ids [B, T], attention_mask [B, T], labels [B, T] or None): right-padded; ``labels_from[b]``
    is the first position of row b that is a target (labels -100 before it and on padding)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = None if labels_from is None else torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[b, :len(s)] = 1
        if labels is not None:
            labels[b, labels_from[b]:len(s)] = ids[b, labels_from[b]:len(s)]
    return ids, mask, labels


def window_features(ds, ctx: Contexts, device) -> tuple[list[torch.Tensor], torch.Tensor]:
    feats, lengths = gather_windows(ds, ctx.start, ctx.row)
    return [f.to(device) for f in feats], lengths.to(device)


@dataclass
class Cost:
    """Summed inference cost: forward passes, tokens and seconds (divide by users for per-user figures)."""

    passes: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def __iadd__(self, other: "Cost") -> "Cost":
        self.passes += other.passes
        self.tokens += other.tokens
        self.seconds += other.seconds
        return self


def batches(n: int, steps: int, batch_size: int, seed: int) -> EpochBatchSampler:
    """The index arrays (int64 [batch_size]) of ``steps`` training steps over ``n`` examples: the data
    loader's epoch sampler (:mod:`userllm.data.loader`, full batches only), the one data order of the project."""
    return EpochBatchSampler(n, batch_size, seed=seed, drop_last=True, steps=steps)


def train_loop(model, loss_of_batch: Callable[[int, np.ndarray], torch.Tensor], sampler: EpochBatchSampler,
               cfg, desc: str, log: Callable[[str], None]) -> dict:
    """AdamW (warmup + cosine to 0.1 lr) on ``model``'s trainable parameters, one step per index array of
    ``sampler`` (``loss_of_batch(step, idx)``); returns losses and time."""
    steps = len(sampler)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = cosine_with_warmup(optimizer, min(cfg.warmup, steps - 1), steps, 0.1)
    model.train()
    losses, t0 = [], time.time()
    bar = progress(total=steps, desc=desc)
    for step, idx in enumerate(sampler):
        loss = loss_of_batch(step, idx)
        optimizer_step(loss, optimizer, scheduler, params, cfg.grad_clip)
        losses.append(loss.item())
        bar.update(1)
    bar.close()
    model.eval()
    k = max(1, steps // 10)
    info = {"steps": steps, "first_loss": float(np.mean(losses[:k])), "final_loss": float(np.mean(losses[-k:])),
            "seconds": round(time.time() - t0, 1)}
    log(f"{desc}: {steps} steps, loss {info['first_loss']:.3f} -> {info['final_loss']:.3f} ({info['seconds']:.0f}s)")
    return info


class NoveltyLLM:
    """A UserLLM that writes the label of the user's next novel cluster."""

    def __init__(self, model, prompts: Prompts, ds, device):
        self.model, self.prompts, self.ds, self.device = model, prompts, ds, device

    def fit(self, ctx: Contexts, targets: np.ndarray, cfg, seed: int, log=print) -> dict:
        """Teacher-forced training on (context, novel cluster) pairs; targets int64 [n]."""
        p, eos = self.prompts, self.prompts.tok.eos_token_id
        prompt_ids = p.with_bos([p.novelty(r) for r in ctx.recent])

        def loss_of_batch(step: int, idx: np.ndarray) -> torch.Tensor:
            seqs = [prompt_ids[i] + p.label_ids[targets[i]] + [eos] for i in idx]
            ids, mask, labels = right_pad(seqs, p.tok.pad_token_id, [len(prompt_ids[i]) for i in idx])
            feats, lengths = window_features(self.ds, ctx.take(idx), self.device)
            return self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), features=feats,
                              lengths=lengths, labels=labels.to(self.device)).loss

        return train_loop(self.model, loss_of_batch, batches(len(ctx), cfg.novelty_steps, cfg.batch_size, seed), cfg,
                          "novelty LLM", log)

    @torch.no_grad()
    def sample(self, ctx: Contexts, allowed: Sequence[Sequence[int]], n: int, temperature: float, top_p: float,
               generator: torch.Generator) -> tuple[list[list[int]], Cost]:
        """``n`` cluster ids per context, each from ``allowed[i]`` (temperature 0 = greedy)."""
        t0 = time.perf_counter()
        p = self.prompts
        ids, mask = left_pad(p.with_bos([p.novelty(r) for r in ctx.recent]), p.tok.pad_token_id, self.device)
        feats, lengths = window_features(self.ds, ctx, self.device)
        stepper = UserLLMStepper(self.model)
        logits, state = stepper.prefill(ids, mask, feats, lengths)
        tries = [user_trie(p.label_ids, a, p.tok.eos_token_id) for a in allowed]
        out = constrained_sample(stepper, logits, state, tries, n, temperature, top_p, generator)
        picks = [[int(allowed[i][e]) for e in row] for i, row in enumerate(out.entries)]
        cost = Cost(len(ctx) + out.fed_tokens, int(mask.sum()) + out.fed_tokens, time.perf_counter() - t0)
        return picks, cost


class AlignedLLM:
    """A UserLLM that scores (user, candidate cluster) as the log-odds of answering yes."""

    def __init__(self, model, prompts: Prompts, ds, device):
        self.model, self.prompts, self.ds, self.device = model, prompts, ds, device

    def _logits(self, ctx: Contexts, pair_ctx: np.ndarray, candidates: Sequence[int]) -> tuple[torch.Tensor, int]:
        """[P, 2] logits (yes, no) of P (context index, candidate) pairs, and the tokens fed."""
        p = self.prompts
        seqs = p.with_bos([p.aligned(ctx.recent[i], c) for i, c in zip(pair_ctx.tolist(), candidates)])
        ids, mask, _ = right_pad(seqs, p.tok.pad_token_id)
        users = np.unique(pair_ctx)
        feats, lengths = window_features(self.ds, ctx.take(users), self.device)
        uctx = self.model.prepare_user_context(feats, lengths)
        uctx = uctx.index_select(torch.from_numpy(np.searchsorted(users, pair_ctx)).to(self.device))
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            user_context=uctx).logits
        last = mask.sum(1).to(self.device) - 1
        at = logits[torch.arange(len(seqs), device=self.device), last]
        return at[:, [p.yes_id, p.no_id]].float(), int(mask.sum())

    def fit(self, ctx: Contexts, positives: np.ndarray, targets: np.ndarray, allowed: Sequence[Sequence[int]],
            cfg, seed: int, log=print) -> dict:
        """Train on each observed transition (yes iff ``positives[i]``) plus ``cfg.aligned_negatives`` other
        clusters of ``allowed[i]`` (no), redrawn every time an example comes up: uniformly, or
        (``cfg.negative_sampling == "popularity"``) in proportion to how often each cluster is a training
        target (+1), so that popularity alone cannot tell the target from the negatives."""
        m = cfg.aligned_negatives
        weight = np.bincount(targets, minlength=len(self.prompts.labels)).astype(np.float64) + 1.0
        if cfg.negative_sampling == "uniform":
            weight[:] = 1.0

        def loss_of_batch(step: int, idx: np.ndarray) -> torch.Tensor:
            rng = np.random.default_rng([seed, 7, step])
            pair_ctx, cand, label = [], [], []
            for i in idx.tolist():
                pair_ctx.append(i), cand.append(int(targets[i])), label.append(0 if positives[i] else 1)
                others = np.array([c for c in allowed[i] if c != targets[i]], dtype=np.int64)
                if len(others):
                    w = weight[others] / weight[others].sum()
                    for c in rng.choice(others, min(m, len(others)), replace=False, p=w).tolist():
                        pair_ctx.append(i), cand.append(int(c)), label.append(1)
            logits, _ = self._logits(ctx, np.asarray(pair_ctx), cand)
            return F.cross_entropy(logits, torch.tensor(label, device=self.device))

        return train_loop(self.model, loss_of_batch, batches(len(ctx), cfg.aligned_steps, cfg.batch_size, seed), cfg,
                          "aligned LLM", log)

    @torch.no_grad()
    def score(self, ctx: Contexts, candidates: Sequence[Sequence[int]], max_pairs: int = 512
              ) -> tuple[list[list[float]], Cost]:
        """Scores (logit yes - logit no) of ``candidates[i]`` for context i, in the same layout."""
        t0 = time.perf_counter()
        pairs = [(i, c) for i, cs in enumerate(candidates) for c in cs]
        flat: list[float] = []
        tokens = 0
        for a in range(0, len(pairs), max_pairs):
            chunk = pairs[a:a + max_pairs]
            logits, fed = self._logits(ctx, np.array([i for i, _ in chunk]), [c for _, c in chunk])
            flat.extend((logits[:, 0] - logits[:, 1]).tolist())
            tokens += fed
        out, k = [], 0
        for cs in candidates:
            out.append(flat[k:k + len(cs)])
            k += len(cs)
        return out, Cost(len(pairs), tokens, time.perf_counter() - t0)
