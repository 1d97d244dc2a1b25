"""Personalized, non-parametric extraction of each user's persistent interest journeys.

Event similarity. Every item vocab id gets two unit vectors: its row of the pretrained encoder's item
embedding table (``encoder.tables["item"]``) and its multi-hot category/genre vector. Two events are
``cos = (1 - w) cos(embeddings) + w cos(genres)`` similar (``w`` = ``--genre-weight``; an item without
categories has genre cosine 0 with everything) and ``1 - cos`` apart. :func:`item_vectors` stores
``[sqrt(1 - w) e ; sqrt(w) g]`` per item, so that a dot product of two rows is exactly that cosine.

Clustering, per user, over that user's events only (the number of journeys is not fixed in advance):

* ``agglomerative``: scikit-learn's :class:`~sklearn.cluster.AgglomerativeClustering` on the precomputed
  distances with ``distance_threshold`` (clusters whose linkage distance exceeds it are not merged);
* ``online``: events in time order; each joins the journey whose centroid (mean vector) is closest
  when that cosine distance is <= the threshold, and opens a new journey otherwise.

A cluster is a **persistent journey** when it has >= ``min_events`` events spanning >= ``min_days`` days;
the others are transient and dropped. Journeys are ordered by size, then by recency (latest event).
Salience = the share of the user's events in the journey x the share of the user's active period
(first to last event) it spans, in [0, 1]: large and long-lived journeys are salient.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import SECONDS_PER_DAY, JourneysConfig


@dataclass
class Journey:
    """One persistent journey of one user.

    user: dense user index; rows: int64 [n] sorted-event rows of its events, in time order;
    start / end: first / last timestamp (seconds); salience: see the module docstring.
    """

    user: int
    rows: np.ndarray
    start: int
    end: int
    salience: float

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def span_days(self) -> float:
        return (self.end - self.start) / SECONDS_PER_DAY


@dataclass
class UserJourneys:
    """A user's persistent journeys (possibly none) and the cluster label of each of their events.

    labels: int64 [n_events] journey index (into ``journeys``) per event of the user, -1 = transient.
    """

    user: int
    journeys: list[Journey]
    labels: np.ndarray


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def genre_vectors(ds) -> np.ndarray:
    """float32 [V_item, C]: unit multi-hot category vector of each item vocab id (zeros without any)."""
    cats = ds.item_categories                                         # [V, K], -1 padded, 0 = UNK
    out = np.zeros((len(cats), len(ds.vocabs["category"])), dtype=np.float32)
    rows, cols = np.nonzero(cats > 0)
    out[rows, cats[rows, cols]] = 1.0
    return _unit_rows(out)


def embedding_vectors(encoder) -> np.ndarray:
    """float32 [V_item, D]: the encoder's item embedding table, rows scaled to unit length."""
    table = encoder.tables["item"].detach().to(torch.float32).cpu().numpy()
    return _unit_rows(table)


def item_vectors(encoder, ds, genre_weight: float) -> np.ndarray:
    """float32 [V_item, D + C] (or [V_item, D] when ``genre_weight`` is 0): dot product = the event cosine."""
    emb = embedding_vectors(encoder)
    if genre_weight == 0.0:
        return emb
    return np.concatenate([np.sqrt(1.0 - genre_weight) * emb, np.sqrt(genre_weight) * genre_vectors(ds)],
                          axis=1).astype(np.float32)


def cluster_events(vectors: np.ndarray, method: str, threshold: float, linkage: str = "average") -> np.ndarray:
    """Cluster labels int64 [n] of ``vectors`` float [n, d] (rows in time order) by cosine distance."""
    n = len(vectors)
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    if method == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        dist = np.clip(1.0 - vectors @ vectors.T, 0.0, 2.0).astype(np.float64)
        np.fill_diagonal(dist, 0.0)
        model = AgglomerativeClustering(n_clusters=None, distance_threshold=threshold, metric="precomputed",
                                        linkage=linkage)
        return model.fit_predict(dist).astype(np.int64)
    if method != "online":
        raise ValueError(f"unknown clustering {method!r}")
    labels = np.empty(n, dtype=np.int64)
    sums = np.zeros((0, vectors.shape[1]), dtype=np.float64)
    for i, v in enumerate(vectors):
        if len(sums):
            cos = (sums @ v) / np.maximum(np.linalg.norm(sums, axis=1), 1e-12)
            best = int(np.argmax(cos))
            if 1.0 - cos[best] <= threshold:
                labels[i] = best
                sums[best] += v
                continue
        labels[i] = len(sums)
        sums = np.vstack([sums, v[None].astype(np.float64)])
    return labels


def user_journeys(ds, user: int, vectors: np.ndarray, cfg: JourneysConfig) -> UserJourneys:
    """Cluster ``user``'s events and keep the persistent clusters (see the module docstring).

    vectors: float [V_item, d] from :func:`item_vectors`.
    """
    lo, hi = int(ds.offsets[user]), int(ds.offsets[user + 1])
    rows = np.arange(lo, hi, dtype=np.int64)
    ts = ds.events.timestamp[lo:hi]
    clusters = cluster_events(vectors[ds.features["item"][lo:hi]], cfg.clustering, cfg.distance_threshold,
                              cfg.linkage)
    user_span = max(int(ts[-1] - ts[0]), 1)
    found = []
    for c in np.unique(clusters):
        members = np.flatnonzero(clusters == c)
        start, end = int(ts[members[0]]), int(ts[members[-1]])
        if len(members) < cfg.min_events or (end - start) < cfg.min_days * SECONDS_PER_DAY:
            continue
        salience = (len(members) / len(rows)) * ((end - start) / user_span)
        found.append(Journey(user, rows[members], start, end, float(min(1.0, salience))))
    found.sort(key=lambda j: (-j.size, -j.end))
    if cfg.max_journeys:
        found = found[: cfg.max_journeys]
    labels = np.full(len(rows), -1, dtype=np.int64)
    for k, j in enumerate(found):
        labels[j.rows - lo] = k
    return UserJourneys(user, found, labels)


def extract_all(ds, vectors: np.ndarray, cfg: JourneysConfig, users=None) -> list[UserJourneys]:
    """:func:`user_journeys` of every user (or of ``users``), in user order."""
    from ..training import progress

    users = range(ds.num_users) if users is None else users
    return [user_journeys(ds, int(u), vectors, cfg) for u in progress(users, desc="extract journeys")]


# ------------------------------------------------------------------------------------------ quality
def mean_pairwise_cosine(unit: np.ndarray) -> float:
    """Mean cosine over the distinct pairs of rows of ``unit`` float [n, d] (rows of norm 1 or 0), n >= 2.

    Uses |sum x|^2 = sum_i |x_i|^2 + sum_{i != j} x_i . x_j, so a 2,000-event journey costs O(n d).
    """
    n = len(unit)
    s = unit.sum(axis=0, dtype=np.float64)
    return float((s @ s - np.square(unit, dtype=np.float64).sum()) / (n * (n - 1)))


def journey_quality(ds, extracted: list[UserJourneys], spaces: dict[str, np.ndarray], seed: int = 0) -> dict:
    """Coherence, persistence and coverage of the extracted journeys.

    spaces: {name: float [V_item, d] unit rows}: coherence is measured in each (e.g. the encoder
    embeddings and the genre vectors). For every journey a random group of the same size is drawn from
    the same user's events (seeded): ``coherence[name]`` = mean intra-journey pairwise cosine,
    ``random[name]`` = the same over the random groups, ``ratio[name]`` = their quotient (None when the random cosine is <= 0).
    """
    rng = np.random.default_rng([seed, 3])
    intra = {k: [] for k in spaces}
    rand = {k: [] for k in spaces}
    spans, span_share, coverage = [], [], []
    for uj in extracted:
        lo, hi = int(ds.offsets[uj.user]), int(ds.offsets[uj.user + 1])
        items = ds.features["item"][lo:hi]
        ts = ds.events.timestamp[lo:hi]
        user_span = max(int(ts[-1] - ts[0]), 1)
        coverage.append(float((uj.labels >= 0).mean()))
        for j in uj.journeys:
            spans.append(j.span_days)
            span_share.append((j.end - j.start) / user_span)
            if j.size < 2:
                continue
            other = rng.choice(hi - lo, size=j.size, replace=False)
            for name, vec in spaces.items():
                intra[name].append(mean_pairwise_cosine(vec[ds.features["item"][j.rows]]))
                rand[name].append(mean_pairwise_cosine(vec[items[other]]))
    n_journeys = sum(len(u.journeys) for u in extracted)
    out = {"users": len(extracted), "journeys": n_journeys,
           "users_without_journey": sum(1 for u in extracted if not u.journeys),
           "journeys_per_user": n_journeys / max(1, len(extracted)),
           "mean_size": float(np.mean([j.size for u in extracted for j in u.journeys])) if n_journeys else 0.0,
           "mean_span_days": float(np.mean(spans)) if spans else 0.0,
           "mean_span_share": float(np.mean(span_share)) if span_share else 0.0,
           "coverage": float(np.mean(coverage)) if coverage else 0.0,
           "coherence": {}, "random": {}, "ratio": {}}
    for name in spaces:
        a, b = (float(np.mean(intra[name])), float(np.mean(rand[name]))) if intra[name] else (0.0, 0.0)
        out["coherence"][name], out["random"][name] = a, b
        out["ratio"][name] = a / b if b > 0 else None     # random groups with no similarity: no ratio
    return out
