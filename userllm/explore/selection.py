"""How best-of-n chooses one of its n sampled clusters from the user-aligned LLM's scores (``--selection``).

* ``top`` (default; the source paper's rule, "select the best of n with the user-aligned LLM"): the
  highest-scored candidate.
* ``lift``: the highest *lift* ``score[u, c] - prior[c]``, where ``prior[c]`` is the user-independent part
  of the aligned scores, the ``b[c]`` of the additive fit ``score[u, c] = a[u] + b[c]``
  (:func:`additive_fit`, the fit behind :mod:`.concentration`). On ml-latest-small best-of-n with ``top``
  converged to the aligned LLM's own ranking of every new cluster, whose top leans to the popular
  clusters, and lost diversity (README, "Exploration"); the lift keeps what the aligned LLM says about
  *this* user beyond what it says about everyone. The prior is fitted on the evaluated users' scores of
  every new cluster (the ``aligned-all`` pass; no label is read). A deployment would fit it once on a
  sample of users: it is one number per cluster.
* ``softmax``: a candidate drawn with probability ``softmax(score / T)`` over the distinct candidates
  (``--selection-temperature T``; at T = 1 in proportion to the aligned LLM's odds of "yes"), seeded.

Every rule picks among the same candidates, so the LLM cost of best-of-n is the same for all three.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SELECTIONS = ("top", "lift", "softmax")
#: Alternating-means passes of the additive fit: on the synthetic CI run the share is stable to 1e-10
#: from 20 passes (10: 1e-8), so 100 leaves a wide margin at a cost of milliseconds.
FIT_ITERATIONS = 100


def additive_fit(scores: Sequence[dict], k: int | None = None, iterations: int = FIT_ITERATIONS
                 ) -> tuple[np.ndarray, float]:
    """``(b, share)``: the per-cluster part ``b`` (float64 [K]) of the least-squares fit
    ``score[u, c] = a[u] + b[c]``, and the share (0..1) of the scores' variance within users it explains.

    scores: per user, {cluster id: aligned score} over its new clusters (users with one cluster add nothing
    to the fit). Fitted by alternating the two sets of means (this two-way layout converges); ``share`` is
    ``1 - SSE(a + b) / SSE(a)``, where ``SSE(a)`` is what is left after each user's own mean. ``b`` is 0 for a
    cluster no user has; it is defined up to a constant, which no rule depends on.
    """
    users, clusters, values = [], [], []
    for u, s in enumerate(scores):
        if len(s) < 2:
            continue
        users.extend([u] * len(s))
        clusters.extend(int(c) for c in s)
        values.extend(float(v) for v in s.values())
    k = k if k is not None else 1 + max((int(c) for s in scores for c in s), default=-1)
    if not values:
        return np.zeros(k), 0.0
    _, u = np.unique(np.asarray(users), return_inverse=True)
    c, v = np.asarray(clusters), np.asarray(values)
    k = max(k, int(c.max()) + 1)
    n_u, n_c = np.bincount(u), np.maximum(np.bincount(c, minlength=k), 1)
    a = np.bincount(u, weights=v) / n_u
    within = float(((v - a[u]) ** 2).sum())
    b = np.zeros(k)
    if within == 0.0:
        return b, 0.0
    for _ in range(iterations):
        b = np.bincount(c, weights=v - a[u], minlength=k) / n_c
        a = np.bincount(u, weights=v - b[c]) / n_u
    return b, float(1.0 - ((v - a[u] - b[c]) ** 2).sum() / within)


def select(candidates: Sequence[int], scores: Sequence[float], rule: str = "top", prior: np.ndarray | None = None,
           temperature: float = 1.0, rng: np.random.Generator | None = None) -> int:
    """One of ``candidates`` (distinct cluster ids) by ``rule`` from their aligned ``scores`` (same order);
    ``prior`` (float [K], ``lift``) and ``rng`` (``softmax``). Ties keep the first candidate."""
    s = np.asarray(scores, dtype=np.float64)
    if rule == "top":
        return int(candidates[int(np.argmax(s))])
    if rule == "lift":
        if prior is None:
            raise ValueError("the lift rule needs the per-cluster prior")
        return int(candidates[int(np.argmax(s - prior[np.asarray(candidates, dtype=np.int64)]))])
    if rule == "softmax":
        if rng is None:
            raise ValueError("the softmax rule needs a random generator")
        z = (s - s.max()) / temperature
        p = np.exp(z) / np.exp(z).sum()
        return int(candidates[int(rng.choice(len(s), p=p))])
    raise ValueError(f"selection rule must be one of {SELECTIONS}, got {rule!r}")


def selection_rng(seed: int, n: int) -> np.random.Generator:
    """The softmax rule's generator for best-of-``n`` at ``seed`` (the same in a run and a re-scoring)."""
    return np.random.default_rng([seed, 31, n])
