"""A deterministic synthetic event dataset: the embedded default of every command.

The generative story (every piece is there so that one task is learnable, or one reader path exercised):

* Categories get genre-like names. Items come in **series** (a film and its sequels: "The Crimson
  Harbor (1994)", "The Crimson Harbor II (1997)", ...) that share 1-3 categories; a few items have no
  category at all (as Amazon items without metadata). Series popularity is Zipf (``popularity_exponent``)
  and each sequel is less popular than the one before.
* Each user has latent category preferences (softmax of Gaussian logits) that **drift** slowly: a random
  walk of the logits, ``drift`` per event.
* At each step a user either continues the series of the item just consumed (probability
  ``sequel_prob`` when the next part exists and is unseen) or draws an unseen item with probability
  proportional to ``affinity ** preference_weight * popularity``, where affinity is the user's mean
  preference over the item's categories. So NextItem is learnable from the sequence (sequels, and the
  categories a user favours), FavGenre from the history's categories, and a sequence model beats
  popularity clearly.
* Ratings (1..5, some half stars) grow with how well the item matches the user's favourite category;
  a few are missing (NaN, as in sources without ratings).
* Review summaries and texts are short sentences derived from the rating and the item's categories
  (so ReviewG is learnable from item, category and rating); a few texts are missing (None).
* Timestamps: per user increasing, exponential gaps, some exact ties (``tie_prob``). Rows are emitted
  in global time order (a log file), so users interleave and the loader's (user, time, row) sort and its
  tie-break by source row are exercised; tied events keep their generation order.

Everything is drawn from one ``numpy.random.Generator`` seeded by ``cfg.seed``: the same config gives
the same table, bit for bit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .events import EventTable, ItemCatalog

GENRES = ("Drama", "Comedy", "Thriller", "Romance", "Action", "Crime", "Adventure", "Horror", "Sci-Fi",
          "Fantasy", "Mystery", "Animation", "Children", "Documentary", "War", "Musical", "Western",
          "Film-Noir")
ADJECTIVES = ("Crimson", "Silent", "Golden", "Broken", "Hidden", "Frozen", "Burning", "Distant", "Wild",
              "Hollow", "Silver", "Midnight", "Lost", "Bitter", "Electric", "Restless", "Scarlet", "Quiet",
              "Iron", "Velvet", "Savage", "Gentle", "Endless", "Fading", "Northern", "Painted", "Shattered",
              "Sacred", "Stolen", "Wandering", "Emerald", "Forgotten", "Rising", "Last", "Secret", "Pale",
              "Dark", "Bright", "Lonely", "Final")
NOUNS = ("Harbor", "Empire", "Garden", "River", "Mirror", "Kingdom", "Promise", "Horizon", "Shadow",
         "Orchard", "Voyage", "Station", "Lantern", "Frontier", "Labyrinth", "Summer", "Winter", "Island",
         "Circus", "Citadel", "Letter", "Storm", "Compass", "Carnival", "Desert", "Signal", "Tower", "Valley",
         "Machine", "Symphony", "Heart", "Crown", "Witness", "Bridge", "Forest", "Canyon", "Dream",
         "Planet", "Echo", "Road")
ROMAN = ("", " II", " III", " IV", " V", " VI", " VII", " VIII", " IX", " X")

SUMMARIES = {  # rating bucket -> templates; {cat} is the item's first category, lower case
    5: ("A {cat} masterpiece", "Loved this {cat} gem", "An instant {cat} classic"),
    4: ("A solid {cat} pick", "Really good {cat}", "Well made {cat}"),
    3: ("An average {cat} outing", "Decent {cat}, nothing more", "Watchable {cat}"),
    2: ("Disappointing {cat}", "A weak {cat} entry", "Not much of a {cat}"),
    1: ("A {cat} disaster", "The worst {cat} I have seen", "Avoid this {cat}"),
}
VERDICTS = {
    5: "I would watch it again tomorrow.",
    4: "I enjoyed most of it.",
    3: "It has its moments but drags in places.",
    2: "I expected a lot more from it.",
    1: "I could not finish it.",
}


@dataclass
class SyntheticConfig:
    """Size and shape of the synthetic dataset (defaults: a few seconds of CPU for the whole pipeline)."""

    num_users: int = 300
    num_items: int = 400
    num_categories: int = 12
    min_events: int = 40                   # events per user, uniform in [min_events, max_events]
    max_events: int = 80
    seed: int = 0
    popularity_exponent: float = 1.0       # Zipf exponent over series
    sequel_decay: float = 0.6              # popularity of part k+1 = sequel_decay * part k
    max_series_length: int = 5             # parts per series, uniform in [1, max_series_length] (<= 10)
    extra_category_prob: float = 0.45      # chance of a 2nd category, and again (given a 2nd) of a 3rd
    empty_category_items: int = 3          # items with no category
    preference_spread: float = 1.5         # std of the initial preference logits (higher = pickier users)
    preference_weight: float = 2.0         # exponent on the affinity when choosing items
    drift: float = 0.08                    # std of the per-event random walk of the preference logits
    sequel_prob: float = 0.5               # chance of continuing the current series when possible
    rating_noise: float = 0.15
    half_star_prob: float = 0.25
    missing_rating_prob: float = 0.002
    missing_text_prob: float = 0.01
    tie_prob: float = 0.05                 # chance that an event has the same timestamp as the one before
    mean_gap_days: float = 3.0
    start_time: int = 946684800            # 2000-01-01T00:00:00Z

    def validate(self) -> None:
        from ..errors import UserError

        if self.num_users < 1 or self.num_items < 2 or self.num_categories < 1:
            raise UserError("synthetic: num_users >= 1, num_items >= 2 and num_categories >= 1 are required")
        if not 1 <= self.min_events <= self.max_events:
            raise UserError(f"synthetic: need 1 <= min_events <= max_events, got {self.min_events}, "
                            f"{self.max_events}")
        if not 1 <= self.max_series_length <= len(ROMAN):
            raise UserError(f"synthetic: max_series_length must be in [1, {len(ROMAN)}]")
        if not 0 <= self.empty_category_items <= self.num_items:
            raise UserError("synthetic: empty_category_items must be in [0, num_items]")
        for name in ("extra_category_prob", "sequel_prob", "half_star_prob", "missing_rating_prob",
                     "missing_text_prob", "tie_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"synthetic: {name} must be a probability, got {getattr(self, name)}")


def category_names(n: int) -> list[str]:
    return [GENRES[i] if i < len(GENRES) else f"Genre {i + 1}" for i in range(n)]


def _series_names(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct base titles such as "The Crimson Harbor" or "The Lost Garden of the Storm"."""
    A, N = len(ADJECTIVES), len(NOUNS)
    total = A * N * (N + 1)  # third slot: no "of the ..." (0) or one of the nouns
    # short names ("The Crimson Harbor") first, in random order; long ones only when those run out
    codes = np.concatenate([rng.permutation(A * N), A * N + rng.permutation(A * N * N)])[: min(n, total)]
    names = []
    for code in codes.tolist():
        c, rest = divmod(code, A * N)
        a, b = divmod(rest, N)
        name = f"The {ADJECTIVES[a]} {NOUNS[b]}"
        names.append(name if c == 0 else f"{name} of the {NOUNS[c - 1]}")
    names += [f"{names[i % total]} Volume {i // total + 1}" for i in range(total, n)]  # only for huge configs
    return names


def _make_items(cfg: SyntheticConfig, rng: np.random.Generator):
    """Series structure, categories, popularity and titles of ``cfg.num_items`` items."""
    C, I = cfg.num_categories, cfg.num_items
    lengths = []
    while sum(lengths) < I:
        lengths.append(int(rng.integers(1, cfg.max_series_length + 1)))
    lengths[-1] -= sum(lengths) - I
    S = len(lengths)
    series_of = np.repeat(np.arange(S), lengths)                       # [I]
    part = np.concatenate([np.arange(n) for n in lengths])             # [I] 0 = first part
    # next part of the same series (-1 for the last part): what "sequel" transitions follow
    next_in_series = np.where(np.r_[series_of[1:] == series_of[:-1], False], np.arange(I) + 1, -1)

    series_cats: list[tuple[int, ...]] = []
    base_pop = 1.0 / (rng.permutation(S) + 1.0) ** cfg.popularity_exponent
    for _ in range(S):
        k = 1
        while k < 3 and k < C and rng.random() < cfg.extra_category_prob:
            k += 1
        series_cats.append(tuple(sorted(rng.choice(C, size=k, replace=False).tolist())))
    item_cats = [series_cats[s] for s in series_of.tolist()]
    for i in rng.choice(I, size=cfg.empty_category_items, replace=False).tolist():
        item_cats[i] = ()
    popularity = base_pop[series_of] * cfg.sequel_decay ** part
    popularity /= popularity.sum()

    # Affinity = mean preference over the item's categories, as a gather (cat_idx, cat_w: [I, 3]) plus a
    # constant 1/C (the mean of a softmax) for items without category. A gather, not a matmul: tiny BLAS
    # calls are slow on a shared machine.
    cat_idx = np.zeros((I, 3), dtype=np.int64)
    cat_w = np.zeros((I, 3))
    cat_const = np.zeros(I)
    for i, cats in enumerate(item_cats):
        if cats:
            cat_idx[i, : len(cats)] = cats
            cat_w[i, : len(cats)] = 1.0 / len(cats)
        else:
            cat_const[i] = 1.0 / C

    names = _series_names(rng, S)
    first_year = rng.integers(1950, 2015, size=S)
    gaps = rng.integers(1, 5, size=I)
    year = first_year[series_of] + np.where(part == 0, 0, gaps)
    for i in range(1, I):  # sequels come out after the previous part
        if part[i] > 0:
            year[i] = year[i - 1] + gaps[i]
    titles = [f"{names[s]}{ROMAN[p]} ({y})" for s, p, y in zip(series_of.tolist(), part.tolist(), year.tolist())]
    return item_cats, (cat_idx, cat_w, cat_const), popularity, next_in_series, titles


def _reviews(rng, ratings_true, items, item_cats, titles, cat_names):
    """Summary and text per event from its (pre-masking) rating and item categories."""
    E = len(items)
    bucket = np.clip(np.rint(ratings_true), 1, 5).astype(int)
    pick = rng.integers(0, 3, size=E)
    summaries, texts = [], []
    for b, p, i in zip(bucket.tolist(), pick.tolist(), items.tolist()):
        cats = [cat_names[c] for c in item_cats[i]]
        cat = cats[0].lower() if cats else "film"
        summary = SUMMARIES[b][p].format(cat=cat)
        name = titles[i].rsplit(" (", 1)[0]
        if len(cats) > 1:
            about = "mixes " + " and ".join(c.lower() for c in cats)
        else:
            about = f"is pure {cat}" if cats else "is hard to put in a box"
        summaries.append(summary)
        texts.append(f"{summary}. {name} {about}. {VERDICTS[b]}")
    return np.array(summaries, dtype=object), np.array(texts, dtype=object)


def generate_synthetic(cfg: SyntheticConfig | None = None) -> EventTable:
    """Generate the synthetic :class:`EventTable` described in the module docstring (deterministic)."""
    cfg = SyntheticConfig() if cfg is None else cfg
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    C, I, U = cfg.num_categories, cfg.num_items, cfg.num_users
    cat_names = category_names(C)
    item_cats, (cat_idx, cat_w, cat_const), popularity, next_in_series, titles = _make_items(cfg, rng)

    n_events = rng.integers(cfg.min_events, cfg.max_events + 1, size=U)
    logits = rng.normal(0.0, cfg.preference_spread, size=(U, C))
    T = int(n_events.max())
    chosen = np.full((U, T), -1, dtype=np.int64)
    match = np.zeros((U, T))
    seen = np.zeros((U, I), dtype=bool)
    last = np.full(U, -1, dtype=np.int64)
    users = np.arange(U)
    for t in range(T):
        active = users[n_events > t]
        logits[active] += rng.normal(0.0, cfg.drift, size=(len(active), C))
        z = logits[active] - logits[active].max(axis=1, keepdims=True)
        pref = np.exp(z)
        pref /= pref.sum(axis=1, keepdims=True)                        # [A, C]
        affinity = (pref[:, cat_idx] * cat_w).sum(axis=2) + cat_const     # [A, I]
        w = affinity ** cfg.preference_weight * popularity
        w_unseen = np.where(seen[active], 0.0, w)
        exhausted = w_unseen.sum(axis=1) <= 0                           # everything seen: allow repeats
        w = np.where(exhausted[:, None], w, w_unseen)
        cum = np.cumsum(w, axis=1)
        draw = (cum < rng.random(len(active))[:, None] * cum[:, -1:]).sum(axis=1)
        draw = np.minimum(draw, I - 1)
        nxt = np.where(last[active] >= 0, next_in_series[np.maximum(last[active], 0)], -1)
        can_continue = (nxt >= 0) & ~seen[active, np.maximum(nxt, 0)]
        take_sequel = can_continue & (rng.random(len(active)) < cfg.sequel_prob)
        item = np.where(take_sequel, nxt, draw)
        chosen[active, t] = item
        # How well the item fits the user's favourite category, in (0, 1].
        match[active, t] = affinity[np.arange(len(active)), item] / pref.max(axis=1)
        seen[active, item] = True
        last[active] = item

    valid = chosen >= 0
    user = np.broadcast_to(users[:, None], chosen.shape)[valid]          # user-major, time order
    item = chosen[valid]
    E = len(item)
    score = np.clip(match[valid] + rng.normal(0.0, cfg.rating_noise, size=E), 0.0, 1.0)
    raw = 1.0 + 4.0 * score
    half = rng.random(E) < cfg.half_star_prob
    rating_true = np.where(half, np.round(raw * 2.0) / 2.0, np.round(raw))
    summary, text = _reviews(rng, rating_true, item, item_cats, titles, cat_names)
    rating = rating_true.astype(np.float32)
    rating[rng.random(E) < cfg.missing_rating_prob] = np.nan
    text[rng.random(E) < cfg.missing_text_prob] = None

    gaps = rng.exponential(cfg.mean_gap_days * 86400.0, size=E).astype(np.int64) + 1
    gaps[rng.random(E) < cfg.tie_prob] = 0
    first = np.r_[True, user[1:] != user[:-1]]
    gaps[first] = rng.integers(0, 10 * 365 * 86400, size=int(first.sum()))
    # cumulative sum restarted at each user's first event
    csum = np.cumsum(gaps)
    starts = np.flatnonzero(first)
    offset = np.repeat(csum[starts] - gaps[starts], np.diff(np.r_[starts, E]))
    timestamp = cfg.start_time + csum - offset

    # Emit in global time order; the stable sort keeps tied events of a user in generation order.
    order = np.argsort(timestamp, kind="stable")
    catalog = ItemCatalog(raw_ids=np.array([str(i + 1) for i in range(I)]), titles=titles,
                          categories=[tuple(cat_names[c] for c in cats) for cats in item_cats])
    return EventTable(
        user=user[order].astype(np.int64), item=item[order].astype(np.int64),
        timestamp=timestamp[order].astype(np.int64), rating=rating[order],
        user_ids=np.array([f"u{u + 1}" for u in range(U)]), items=catalog,
        summary=summary[order], text=text[order], name="synthetic",
        meta={"source": "synthetic", "config": asdict(cfg)},
    )
