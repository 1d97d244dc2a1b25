"""Interest clusters over the encoder's item embeddings, novel transitions, and their feedback.

* **Clusters** (:func:`build_clusters`): scikit-learn ``KMeans`` over the pretrained encoder's item
  table (``encoder.tables["item"]``, one row per item vocab id; for the AR encoder this is also the
  tied next-item softmax matrix, so items the encoder predicts in the same contexts lie close). Rows are
  L2-normalised first, so the clusters follow the direction of an embedding, which is what the tied head's
  dot products compare, rather than its norm (which mostly tracks popularity).
* **Labels** (:func:`cluster_labels`): the two categories most *over-represented* in the cluster (its
  popularity-weighted share of the category minus the share over all items), e.g. ``"Horror & Thriller"``.
  A raw-share rule names every MovieLens cluster "Drama & Comedy"; the excess share names what sets a
  cluster apart. Clusters whose labels collide get their most popular title appended, then a number.
* **Novel transitions** (:func:`novel_transitions`): an event at row ``t`` is novel when its cluster does
  not occur among the user's ``window`` events before it (rows ``t - window .. t - 1``); only events with a
  full window before them count, so "new" always means "absent from the same amount of history".
* **Feedback** on a novel transition (the rule, :func:`feedback`):
    - ``rating``: the event's rating >= ``rating_threshold`` (a missing rating is not positive);
    - ``engagement``: the user comes back to the same cluster within the next ``follow_up`` events;
    - ``both``: rating and engagement; ``either`` (default): rating or engagement.
  Only transitions with ``follow_up`` events after them are kept, so engagement is always observable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEEDBACK_RULES = ("rating", "engagement", "both", "either")


@dataclass
class InterestClusters:
    """K interest clusters over the item vocabulary.

    item_cluster: int64 [V_item], the cluster of each item vocab id (-1 for UNK, id 0).
    labels: K distinct short texts.
    sizes: int64 [K], items per cluster.
    """

    item_cluster: np.ndarray
    labels: list[str]
    sizes: np.ndarray

    @property
    def k(self) -> int:
        return len(self.labels)

    def items_of(self, cluster: int) -> np.ndarray:
        """int64 [n]: the item vocab ids of ``cluster``."""
        return np.flatnonzero(self.item_cluster == cluster)


def build_clusters(ds, item_embeddings: np.ndarray, k: int, seed: int = 0) -> InterestClusters:
    """KMeans over ``item_embeddings`` float [V_item, D] (row 0 = UNK is left out), labelled from ``ds``."""
    from sklearn.cluster import KMeans

    emb = np.asarray(item_embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != ds.num_items:
        raise ValueError(f"item embeddings must be [{ds.num_items}, D], got {emb.shape}")
    n_items = ds.num_items - 1
    if not 2 <= k <= n_items:
        raise ValueError(f"--clusters {k}: need 2 <= K <= {n_items} (the dataset's items)")
    x = emb[1:] / np.maximum(np.linalg.norm(emb[1:], axis=1, keepdims=True), 1e-12)
    # n_init=4: on ml-latest-small (9.7k items, 64 dims) the inertia of 4 restarts varied by < 1%, and
    # each costs ~0.2 s; one restart (sklearn's default for k-means++) sometimes left a near-empty cluster.
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x)
    item_cluster = np.concatenate([[-1], km.labels_]).astype(np.int64)
    sizes = np.bincount(km.labels_, minlength=k).astype(np.int64)
    return InterestClusters(item_cluster, cluster_labels(ds, item_cluster, k), sizes)


def cluster_labels(ds, item_cluster: np.ndarray, k: int) -> list[str]:
    """K distinct labels from the clusters' over-represented categories (module docstring)."""
    cats = ds.item_categories                                        # [V, C] category ids, -1 padded
    n_cat = len(ds.vocabs["category"])
    pop = np.bincount(ds.features["item"], minlength=ds.num_items).astype(np.float64) + 1.0
    pop[0] = 0.0
    weight = np.zeros((k, n_cat))                                    # popularity mass per (cluster, category)
    valid = (cats > 0) & (item_cluster[:, None] >= 0)
    rows, cols = np.nonzero(valid)
    np.add.at(weight, (item_cluster[rows], cats[rows, cols]), pop[rows])
    mass = np.zeros(k)
    np.add.at(mass, item_cluster[1:], pop[1:])
    share = weight / np.maximum(mass[:, None], 1e-12)
    overall = weight.sum(0) / max(mass.sum(), 1e-12)
    titles = ds.item_titles(np.arange(ds.num_items))
    base, keys = [], []
    for c in range(k):
        excess = share[c] - overall
        order = [g for g in np.argsort(-excess, kind="stable") if excess[g] > 0 and weight[c, g] > 0][:2]
        names = [n for n in ds.category_names(np.array(order, dtype=np.int64)) if n]
        base.append(" & ".join(names))
        keys.append(frozenset(names))          # "Horror & Comedy" and "Comedy & Horror" collide too
    labels = list(base)
    for c in range(k):
        if not labels[c] or keys.count(keys[c]) > 1:
            members = np.flatnonzero(item_cluster == c)
            top = titles[members[np.argmax(pop[members])]] if len(members) else "cluster"
            labels[c] = f"{base[c]}: {top}" if base[c] else top
    seen: dict[str, int] = {}
    for c, lab in enumerate(labels):           # still equal (same categories, same top title): number them
        seen[lab] = seen.get(lab, 0) + 1
        if labels.count(lab) > 1:
            labels[c] = f"{lab} #{seen[lab]}"
    return [" ".join(lab.split()) for lab in labels]


@dataclass
class Transitions:
    """Novel transitions (arrays of length n, ordered by user then row).

    user: int64 dense user index; row: int64 sorted-event row of the novel event; cluster: int64 its
    cluster; positive: bool the feedback (see :func:`feedback`); rated_well / engaged: bool its two parts.
    """

    user: np.ndarray
    row: np.ndarray
    cluster: np.ndarray
    positive: np.ndarray
    rated_well: np.ndarray
    engaged: np.ndarray

    def __len__(self) -> int:
        return len(self.row)

    def subset(self, idx) -> "Transitions":
        idx = np.asarray(idx)
        return Transitions(*(getattr(self, f)[idx] for f in ("user", "row", "cluster", "positive", "rated_well",
                                                             "engaged")))


def event_clusters(ds, clusters: InterestClusters) -> np.ndarray:
    """int64 [E]: the cluster of every sorted event (-1 for an UNK item)."""
    return clusters.item_cluster[ds.features["item"]]


def novel_transitions(ds, event_cluster: np.ndarray, window: int, follow_up: int, rating_threshold: float,
                      rule: str = "either") -> Transitions:
    """Every novel event with a full ``window`` before it and ``follow_up`` events after it (module docstring)."""
    if rule not in FEEDBACK_RULES:
        raise ValueError(f"feedback rule must be one of {FEEDBACK_RULES}, got {rule!r}")
    if window < 1 or follow_up < 0:
        raise ValueError(f"need window >= 1 and follow_up >= 0, got {window}, {follow_up}")
    E = len(event_cluster)
    user = np.repeat(np.arange(ds.num_users), np.diff(ds.offsets))
    pos = np.arange(E) - ds.offsets[user]                     # index of the event within its user
    left = ds.offsets[user + 1] - 1 - np.arange(E)            # events after it
    ok = (pos >= window) & (left >= follow_up) & (event_cluster >= 0)
    novel = ok.copy()
    for w in range(1, window + 1):                            # absent from each of the `window` rows before
        prev = np.roll(event_cluster, w)
        novel &= prev != event_cluster
    engaged = np.zeros(E, dtype=bool)
    for h in range(1, follow_up + 1):
        nxt = np.roll(event_cluster, -h)
        engaged |= (nxt == event_cluster) & (h <= left)
    rating = np.asarray(ds.events.rating, dtype=np.float64)
    rated_well = np.nan_to_num(rating, nan=-np.inf) >= rating_threshold
    rows = np.flatnonzero(novel)
    positive = feedback(rated_well[rows], engaged[rows], rule)
    return Transitions(user[rows].astype(np.int64), rows.astype(np.int64), event_cluster[rows].astype(np.int64),
                       positive, rated_well[rows], engaged[rows])


def feedback(rated_well: np.ndarray, engaged: np.ndarray, rule: str) -> np.ndarray:
    """bool [n]: the feedback of novel transitions under ``rule`` (rating | engagement | both | either)."""
    if rule == "rating":
        return rated_well.copy()
    if rule == "engagement":
        return engaged.copy()
    if rule == "both":
        return rated_well & engaged
    if rule == "either":
        return rated_well | engaged
    raise ValueError(f"feedback rule must be one of {FEEDBACK_RULES}, got {rule!r}")


def split_users(num_users: int, test_fraction: float, seed: int) -> np.ndarray:
    """bool [U]: True for the held-out (test) users, a seeded random ``test_fraction`` of them (>= 1)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must lie in (0, 1), got {test_fraction}")
    n_test = min(num_users - 1, max(1, round(num_users * test_fraction)))
    test = np.zeros(num_users, dtype=bool)
    test[np.random.default_rng([seed, 13]).choice(num_users, n_test, replace=False)] = True
    return test


def last_per_user(tr: Transitions) -> np.ndarray:
    """Indices of each user's last transition (the held-out users' evaluation targets)."""
    if not len(tr.user):
        return np.zeros(0, dtype=np.int64)
    last = np.r_[tr.user[1:] != tr.user[:-1], True]
    return np.flatnonzero(last)


def recent_clusters(event_cluster: np.ndarray, row: int, window: int) -> list[int]:
    """Distinct clusters of rows ``row - window .. row - 1`` (callers guarantee they are one user's),
    ordered by their last occurrence, oldest first."""
    seq = [int(c) for c in event_cluster[max(0, row - window):row] if c >= 0]
    last = {c: i for i, c in enumerate(seq)}
    return sorted(last, key=last.get)
