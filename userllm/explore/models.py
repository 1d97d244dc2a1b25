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
  17 for the novelty LLM's samples). With ``head`` (``--aligned-head user``) a :class:`UserHead` on the user
  embedding is added to that log-odds; :meth:`AlignedLLM.heldout` measures it on held-out pairs.

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
from ..loop import cosine_with_warmup, optimizer_step, train_loop
from ..utils.hf import IGNORE
from .clusters import recent_clusters
from .pairs import draw_pairs, negative_weight, pair_metrics
from .sampling import constrained_sample, user_trie

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

    def new_clusters(self, k: int) -> list[list[int]]:
        """Per context, the clusters of 0..k-1 not among its recent ones: the novel candidates."""
        return [[c for c in range(k) if c not in set(r)] for r in self.recent]

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


def fit_steps(params: Sequence[torch.nn.Parameter], modules: Sequence[torch.nn.Module],
              loss_of_batch: Callable[[int, np.ndarray], torch.Tensor], sampler: EpochBatchSampler, lr: float,
              cfg, desc: str, log: Callable[[str], None]) -> dict:
    """AdamW (warmup + cosine to 0.1 ``lr``) on ``params``, one step per index array of ``sampler``
    (``loss_of_batch(step, idx)``) through the project's :func:`userllm.loop.train_loop` (progress bar,
    stop on a non-finite loss); ``modules`` are in train mode meanwhile. Returns losses and time."""
    steps = len(sampler)
    optimizer = torch.optim.AdamW(list(params), lr=lr, betas=(0.9, 0.95))
    scheduler = cosine_with_warmup(optimizer, min(cfg.warmup, steps - 1), steps, 0.1)
    batches_ = iter(sampler)
    losses: list[float] = []

    def step_fn(step: int):
        loss = loss_of_batch(step, next(batches_))
        optimizer_step(loss, optimizer, scheduler, params, cfg.grad_clip)
        losses.append(loss.item())
        return loss, {}

    for m in modules:
        m.train()
    try:
        result = train_loop(step_fn, start_step=0, total_steps=steps, log_every=max(1, steps // 10),
                            checkpoint_every=steps, desc=desc)
    finally:
        for m in modules:
            m.eval()
    k = max(1, steps // 10)
    info = {"steps": steps, "lr": lr, "first_loss": float(np.mean(losses[:k])),
            "final_loss": float(np.mean(losses[-k:])), "seconds": round(result.seconds, 1)}
    log(f"{desc}: {steps} steps, loss {info['first_loss']:.3f} -> {info['final_loss']:.3f} ({info['seconds']:.0f}s)")
    return info


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


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

        return fit_steps(trainable(self.model), [self.model], loss_of_batch,
                         batches(len(ctx), cfg.novelty_steps, cfg.batch_size, seed), cfg.lr, cfg, "novelty LLM", log)

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


class UserHead(torch.nn.Module):
    """``--aligned-head user``: a small head on the user embedding added to the answer's log-odds.

    For a pair (user window, candidate cluster c): ``b[c] + a * logp_c + u . E[c]`` where ``u`` float [D] is
    the aligned UserLLM's encoder state at the window's last event (``last_hidden``), ``logp_c`` the
    encoder's log-probability that the next item lies in cluster c (its next-item head summed over the
    cluster's items) and ``b`` [K], ``a`` [1], ``E`` [K, D] start at 0, so the score starts as the LLM's
    own answer. Why: the logistic-regression probe (:mod:`.probe`) finds that on ml-latest-small the
    encoder's ``logp_c`` and ``u`` are what separates the pairs (AUC ~0.70 against ~0.54 for the
    per-cluster prior alone), and the answer tokens alone stayed at the base rate (README)."""

    def __init__(self, item_cluster: np.ndarray, k: int, dim: int):
        super().__init__()
        onehot = torch.zeros(len(item_cluster), k)
        ok = np.flatnonzero(item_cluster >= 0)
        onehot[ok, item_cluster[ok]] = 1.0
        self.register_buffer("log_members", torch.log(onehot), persistent=False)       # [V, K]: 0 or -inf
        self.bias = torch.nn.Parameter(torch.zeros(k))
        self.logp_weight = torch.nn.Parameter(torch.zeros(1))
        self.cluster_emb = torch.nn.Parameter(torch.zeros(k, dim))

    def forward(self, encoder, feats, lengths, users: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """float [P]: the head's score of pairs (``users`` int64 [P] rows of the windows ``feats`` /
        ``lengths``, ``candidates`` int64 [P])."""
        h = encoder.last_hidden(feats, lengths)                                          # [B, D]
        u = h.float()
        lp = torch.log_softmax(encoder.feature_logits(h, "item").float(), -1)            # [B, V]: score_next(...)
        logp = torch.logsumexp(lp[:, :, None] + self.log_members[None], 1)                # [B, K]
        return (self.bias[candidates] + self.logp_weight * logp[users, candidates]
                + (u[users] * self.cluster_emb[candidates]).sum(-1))


class AlignedLLM:
    """A UserLLM that scores (user, candidate cluster) as the log-odds of answering yes (plus, with
    ``head``, a :class:`UserHead` on the user embedding)."""

    def __init__(self, model, prompts: Prompts, ds, device, head: UserHead | None = None):
        self.model, self.prompts, self.ds, self.device = model, prompts, ds, device
        self.head = None if head is None else head.to(device)
        if head is not None and not hasattr(model.encoder, "last_hidden"):
            raise ValueError(f"--aligned-head user needs an encoder with a last hidden state (the ar encoder), "
                             f"not {type(model.encoder).__name__}")

    def _logits(self, ctx: Contexts, pair_ctx: np.ndarray, candidates: Sequence[int]) -> tuple[torch.Tensor, int]:
        """[P, 2] logits (yes, no) of P (context index, candidate) pairs, and the tokens fed."""
        p = self.prompts
        seqs = p.with_bos([p.aligned(ctx.recent[i], c) for i, c in zip(pair_ctx.tolist(), candidates)])
        ids, mask, _ = right_pad(seqs, p.tok.pad_token_id)
        users = np.unique(pair_ctx)
        feats, lengths = window_features(self.ds, ctx.take(users), self.device)
        uctx = self.model.prepare_user_context(feats, lengths)
        which = torch.from_numpy(np.searchsorted(users, pair_ctx)).to(self.device)
        uctx = uctx.index_select(which)
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            user_context=uctx).logits
        last = mask.sum(1).to(self.device) - 1
        at = logits[torch.arange(len(seqs), device=self.device), last][:, [p.yes_id, p.no_id]].float()
        if self.head is not None:
            s = self.head(self.model.encoder, feats, lengths, which,
                          torch.as_tensor(list(candidates), dtype=torch.long, device=self.device))
            at = at + torch.stack([s / 2, -s / 2], 1)             # log-odds yes - no: the answer's + s
        return at, int(mask.sum())

    def fit(self, ctx: Contexts, positives: np.ndarray, targets: np.ndarray, allowed: Sequence[Sequence[int]],
            cfg, seed: int, log=print) -> dict:
        """Train on each observed transition (yes iff ``positives[i]``) plus ``cfg.aligned_negatives`` other
        clusters of ``allowed[i]`` (no), redrawn every time an example comes up (:func:`.pairs.draw_pairs`,
        weighted by :func:`.pairs.negative_weight`: ``cfg.negative_sampling``). Learning rate
        ``cfg.aligned_lr`` (0: ``cfg.lr``); ``cfg.aligned_balance``: the two answers weighted so that each
        carries half the loss at the training pairs' expected yes rate."""
        m = cfg.aligned_negatives
        weight = negative_weight(targets, len(self.prompts.labels), cfg.negative_sampling)
        class_weight = None
        if cfg.aligned_balance:
            # expected yes rate of the pairs: positives over (1 + the negatives each transition can get)
            per = np.array([1 + min(m, max(len(a) - 1, 0)) for a in allowed], dtype=np.float64)
            rate = float(positives.sum() / per.sum())
            class_weight = torch.tensor([0.5 / max(rate, 1e-6), 0.5 / max(1 - rate, 1e-6)], device=self.device)

        def loss_of_batch(step: int, idx: np.ndarray) -> torch.Tensor:
            pair_ctx, cand, went = draw_pairs(idx, targets, allowed, m, weight, np.random.default_rng([seed, 7, step]))
            label = np.where(went & positives[pair_ctx], 0, 1)                       # 0 = yes, 1 = no
            logits, _ = self._logits(ctx, pair_ctx, cand.tolist())
            return F.cross_entropy(logits, torch.from_numpy(label).to(self.device), weight=class_weight)

        params = trainable(self.model) + ([] if self.head is None else list(self.head.parameters()))
        modules = [self.model] + ([] if self.head is None else [self.head])
        lr = cfg.aligned_lr or cfg.lr
        return fit_steps(params, modules, loss_of_batch, batches(len(ctx), cfg.aligned_steps, cfg.batch_size, seed),
                         lr, cfg, "aligned LLM", log)

    def heldout(self, ctx: Contexts, positives: np.ndarray, targets: np.ndarray, allowed: Sequence[Sequence[int]],
                negatives: int, weight: np.ndarray, contexts: int, seed: int) -> dict:
        """Whether it learnt: :func:`.pairs.pair_metrics` of its scores on up to ``contexts`` of the given
        (held-out) contexts, each with its target and ``max(1, negatives)`` drawn others."""
        rng = np.random.default_rng([seed, 41])
        idx = np.arange(len(ctx)) if len(ctx) <= contexts else np.sort(rng.choice(len(ctx), contexts, replace=False))
        pair_ctx, cand, went = draw_pairs(idx, targets, allowed, max(1, negatives), weight, rng)
        t0 = time.perf_counter()
        flat: list[float] = []
        with torch.no_grad():
            for a in range(0, len(pair_ctx), 256):
                logits, _ = self._logits(ctx, pair_ctx[a:a + 256], cand[a:a + 256].tolist())
                flat.extend((logits[:, 0] - logits[:, 1]).tolist())
        score = np.asarray(flat)
        out = pair_metrics(score, pair_ctx, went, positives[pair_ctx])
        out |= {"contexts": int(len(idx)), "score_std": float(score.std()), "seconds": round(time.perf_counter() - t0, 1)}
        return out

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
