"""The aligned LLM's (context, candidate) pairs and how well a score separates them on held-out users.

A *pair* is one user context (the window before a novel transition) with one candidate cluster: the
cluster the user went to (``went``) or one of ``m`` other clusters new for that user that it did not go to,
drawn without replacement in proportion to a weight per cluster (:func:`draw_pairs`; the aligned LLM's
training draws them so, :meth:`.models.AlignedLLM.fit`, and the held-out check and :mod:`.probe` too).
Its label for the aligned LLM is ``went and positive`` (yes), else no.

:func:`pair_metrics` says whether a score learnt anything: ``auc`` on that label (pooled over the pairs),
``feedback_auc`` (the went-to pairs only: liked vs not), ``went_auc`` (went-to vs not) and ``group_auc``
(the mean over contexts of the AUC among one context's own pairs: what best-of-n needs, as it compares
one user's candidates; a per-user constant cannot raise it). 0.5 = chance, for every one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def draw_pairs(idx: Sequence[int], targets: np.ndarray, allowed: Sequence[Sequence[int]], m: int,
               weight: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(context index int64 [P], candidate int64 [P], went bool [P]) for contexts ``idx``: each context's
    target ``targets[i]`` then up to ``m`` other clusters of ``allowed[i]``, with probability proportional
    to ``weight`` float [K]."""
    ctx, cand, went = [], [], []
    for i in np.asarray(idx, dtype=np.int64).tolist():
        t = int(targets[i])
        ctx.append(i), cand.append(t), went.append(True)
        others = np.array([c for c in allowed[i] if c != t], dtype=np.int64)
        if m and len(others):
            w = weight[others] / weight[others].sum()
            for c in rng.choice(others, min(m, len(others)), replace=False, p=w).tolist():
                ctx.append(i), cand.append(int(c)), went.append(False)
    return np.asarray(ctx, dtype=np.int64), np.asarray(cand, dtype=np.int64), np.asarray(went, dtype=bool)


def negative_weight(targets: np.ndarray, k: int, rule: str) -> np.ndarray:
    """float [K]: ``popularity`` = how often each cluster is a training target, + 1 (so that popularity
    alone cannot tell the target from the negatives); ``uniform`` = ones."""
    if rule == "uniform":
        return np.ones(k)
    return np.bincount(targets, minlength=k).astype(np.float64) + 1.0


def auc(score: np.ndarray, label: np.ndarray) -> float | None:
    """ROC AUC of ``score`` for bool ``label`` (scikit-learn's: ties count 1/2); None without both labels."""
    from sklearn.metrics import roc_auc_score

    label = np.asarray(label, dtype=bool)
    if label.all() or not label.any():
        return None
    return float(roc_auc_score(label, np.asarray(score, dtype=np.float64)))


def group_auc(score: np.ndarray, label: np.ndarray, group: np.ndarray) -> float | None:
    """Mean over the groups (int64 [P]) holding both labels of the AUC within the group; None if none does."""
    score, label, group = np.asarray(score), np.asarray(label, dtype=bool), np.asarray(group)
    order = np.argsort(group, kind="stable")
    g = group[order]
    cuts = np.flatnonzero(np.r_[True, g[1:] != g[:-1], True])
    aucs = [auc(score[order[a:b]], label[order[a:b]]) for a, b in zip(cuts[:-1], cuts[1:])]
    aucs = [x for x in aucs if x is not None]
    return float(np.mean(aucs)) if aucs else None


def pair_metrics(score: np.ndarray, ctx: np.ndarray, went: np.ndarray, positive: np.ndarray) -> dict:
    """The module docstring's AUCs of ``score`` float [P] over pairs (ctx int64 [P], went bool [P],
    positive bool [P]: the feedback of the pair's context's transition), and the pair counts."""
    yes = went & positive
    return {"pairs": int(len(score)), "yes_rate": float(yes.mean()) if len(yes) else None,
            "auc": auc(score, yes), "feedback_auc": auc(score[went], positive[went]),
            "went_auc": auc(score, went), "group_auc": group_auc(score, yes, ctx)}
