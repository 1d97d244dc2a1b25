"""Evaluation metrics: full-ranking Recall@k / NDCG@k for next-item prediction, a popularity baseline, and
ROUGE for review generation; :func:`seed_stats`, the mean ± std over seeds that every multi-seed table reports.

Ranking protocol (:func:`label_ranks`):
  * every item of the vocabulary is a candidate (no sampled negatives), except the reserved ids:
    UNK (id 0) never counts, and padding (-1) is not a column;
  * ``seen`` (the ``filter_seen`` option of the CLIs) removes the items already in the user's history
    from the candidates, except the label itself, which always stays a candidate (the SASRec
    convention: a repeat consumption can still be a hit, but seen items cannot crowd it out);
  * ties are broken pessimistically: the label's rank counts every other candidate scoring >= it, so a
    constant scorer gets rank |candidates| - 1, never a lucky hit.
With one label per example, Recall@k is the hit rate ``rank < k`` and NDCG@k is ``1 / log2(rank + 2)``
when ``rank < k`` (else 0), averaged over examples.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

UNK_ID = 0
KS = (1, 5, 10)  # the Recall@k cut-offs every table reports (the paper's)


def seen_mask(history: torch.Tensor, num_items: int) -> torch.Tensor:
    """bool [B, I] from history item ids [B, L] (-1 padded): True where the item occurs in the history."""
    B = history.shape[0]
    mask = torch.zeros(B, num_items, dtype=torch.bool, device=history.device)
    valid = history >= 0
    rows = torch.arange(B, device=history.device)[:, None].expand_as(history)
    mask[rows[valid], history[valid]] = True
    return mask


def label_ranks(scores: torch.Tensor, labels: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each label among the candidates (see the module docstring).

    scores: float [B, I]; labels: int [B] in [1, I); seen: None, bool [B, I], or history ids int [B, L]
    (-1 padded). Returns int64 [B].
    """
    if scores.dim() != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"scores must be [B, I] and labels [B], got {tuple(scores.shape)}, {tuple(labels.shape)}")
    B, I = scores.shape
    labels = labels.to(scores.device).long()
    if B and (int(labels.min()) < 1 or int(labels.max()) >= I):
        raise ValueError(f"labels must be real item ids in [1, {I}), got [{int(labels.min())}, {int(labels.max())}]")
    scores = scores.float().clone()
    scores[:, UNK_ID] = float("-inf")
    rows = torch.arange(B, device=scores.device)
    target = scores[rows, labels].clone()
    excluded = torch.zeros(B, I, dtype=torch.bool, device=scores.device)
    excluded[:, UNK_ID] = True
    if seen is not None:
        seen = seen.to(scores.device)
        if seen.dtype != torch.bool:
            seen = seen_mask(seen.long(), I)
        excluded |= seen
    excluded[rows, labels] = True                            # the label is not its own competitor...
    better = (scores >= target[:, None]) & ~excluded         # ...and ties with others count against it
    return better.sum(dim=1)


def recall_at_k(ranks: torch.Tensor, k: int) -> float:
    """Fraction of examples whose label ranks in the top k (ranks 0-based)."""
    return float((ranks < k).float().mean()) if len(ranks) else 0.0


def ndcg_at_k(ranks: torch.Tensor, k: int) -> float:
    """Mean NDCG@k with one relevant item per example: 1 / log2(rank + 2) inside the top k, else 0."""
    if not len(ranks):
        return 0.0
    gain = 1.0 / torch.log2(ranks.double() + 2.0)
    return float(torch.where(ranks < k, gain, torch.zeros_like(gain)).mean())


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = KS, ndcg_ks: Sequence[int] = (10,)
                       ) -> dict[str, float]:
    """{"recall@k" for k in ks, "ndcg@k" for k in ndcg_ks, "count"}."""
    out = {f"recall@{k}": recall_at_k(ranks, k) for k in ks}
    out.update({f"ndcg@{k}": ndcg_at_k(ranks, k) for k in ndcg_ks})
    out["count"] = int(len(ranks))
    return out


def rank_metrics(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                 seen: torch.Tensor | None = None, ndcg_ks: Sequence[int] = (10,)) -> dict[str, float]:
    """Recall@k for ``ks`` and NDCG@k for ``ndcg_ks`` of ``scores [B, I]`` against ``labels [B]``.

    For large evaluations compute :func:`label_ranks` per batch, concatenate, and call
    :func:`metrics_from_ranks` once.
    """
    return metrics_from_ranks(label_ranks(scores, labels, seen), ks, ndcg_ks)


def popularity_scores(item_ids: np.ndarray | torch.Tensor, num_items: int) -> torch.Tensor:
    """Popularity baseline: float32 [I] = how often each item id occurs in ``item_ids`` (ids < 0 ignored).

    Count only training interactions, so that no evaluation label leaks into the baseline.
    """
    ids = torch.as_tensor(np.asarray(item_ids)).long().reshape(-1)
    ids = ids[ids >= 0]
    return torch.bincount(ids, minlength=num_items).float()


# ---- ROUGE ------------------------------------------------------------------------------------------------
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """One sentence per line, as rouge-score's ``rougeLsum`` expects (it splits summaries on newlines)."""
    lines = []
    for line in text.strip().splitlines():
        lines.extend(s for s in _SENTENCE_END.split(line.strip()) if s)
    return "\n".join(lines)


def rouge(preds: Sequence[str], refs: Sequence[str],
          types: Sequence[str] = ("rouge1", "rouge2", "rougeL", "rougeLsum")) -> dict[str, float]:
    """Mean F1 (in [0, 1]) of each ROUGE type over the pairs, via the ``rouge-score`` package (Porter
    stemming on). Sentences are put on separate lines first so that ``rougeLsum`` is summary-level."""
    from rouge_score import rouge_scorer

    if len(preds) != len(refs):
        raise ValueError(f"rouge: {len(preds)} predictions but {len(refs)} references")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    totals = {t: 0.0 for t in types}
    for pred, ref in zip(preds, refs):
        result = scorer.score(split_sentences(ref), split_sentences(pred))   # score(target, prediction)
        for t in types:
            totals[t] += result[t].fmeasure
    n = max(1, len(preds))
    return {t: totals[t] / n for t in types}


def seed_stats(values: Sequence[float]) -> dict:
    """{"mean", "std", "values"} of one figure over seeds: the sample std (ddof 1), 0.0 for one value;
    mean and std None for no values."""
    vals = list(values)
    mean = float(np.mean(vals)) if vals else None
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0 if vals else None
    return {"mean": mean, "std": std, "values": vals}
