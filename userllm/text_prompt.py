"""Text rendering of user histories and task prompts (the TextPrompt baseline and the LLM-side prompts).

Every task is a prompt followed by a target string the LLM learns to produce:

* ``nextitem``: "Which item will the user interact with next?" -> the next item's title;
* ``favgenre``: "What is the user's favorite genre?" (``category`` on non-movie data) -> a category name;
* ``reviewg``:  "Write the user's review of <title>." -> the review text.

The history can be given three ways, chosen by how many of the window's events are rendered as text:

* User-LLM (``text_events=0``): no history text; the events reach the LLM only through the encoder;
* TextPrompt baseline (``text_events=None``, i.e. all): every window event as a line of text, with no
  user embeddings at all;
* mixed long/short context, the paper's AR50TP10 (``text_events=n``): the encoder sees the N-event window
  and the last n of those events are also rendered as text.

One history line per event: ``"<title> | <rating> stars | <genre>, <genre>"`` (rating/genres omitted
when the source has none). Targets start with a space so that prompt and target token ids concatenate
exactly as they were trained and as the constrained decoder scores them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .data.examples import TASKS

HISTORY_HEADER = "History:"
ANSWER = "Answer:"


def format_rating(rating: float | None) -> str | None:
    """``4.0 -> "4"``, ``3.5 -> "3.5"``; None/NaN -> None (no rating)."""
    if rating is None:
        return None
    r = float(rating)
    if math.isnan(r):
        return None
    return str(int(r)) if r == int(r) else f"{r:g}"


def render_event(title: str, rating: float | None = None, categories: Sequence[str] = ()) -> str:
    """One history line (no trailing newline)."""
    parts = [title]
    r = format_rating(rating)
    if r is not None:
        parts.append(f"{r} stars")
    if categories:
        parts.append(", ".join(categories))
    return " | ".join(parts)


def render_history(events: Iterable[tuple[str, float | None, Sequence[str]]]) -> str:
    """Numbered history lines, oldest first: ``"1. Heat (1995) | 4 stars | Action\\n2. ..."``."""
    return "\n".join(f"{i}. {render_event(*e)}" for i, e in enumerate(events, 1))


def task_question(task: str, *, category_word: str = "genre", item_title: str | None = None) -> str:
    """The question of ``task``; ``item_title`` is the reviewed item for ``reviewg``."""
    if task == "nextitem":
        return "Which item will the user interact with next?"
    if task == "favgenre":
        return f"What is the user's favorite {category_word}?"
    if task == "reviewg":
        return f"Write the user's review of {item_title if item_title is not None else 'the item'}."
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def build_prompt(task: str, history: str | None = None, *, category_word: str = "genre",
                 item_title: str | None = None, question: str | None = None) -> str:
    """The full prompt text (without BOS): optional history block, question (the task's, or ``question``),
    ``"Answer:"``."""
    q = question if question is not None else task_question(task, category_word=category_word,
                                                            item_title=item_title)
    if history:
        return f"{HISTORY_HEADER}\n{history}\n{q}\n{ANSWER}"
    return f"{q}\n{ANSWER}"


def target_text(value: str) -> str:
    """The text the LLM produces after the prompt (a leading space; EOS is appended as a token id)."""
    return " " + value.strip()


def template_texts(category_word: str = "genre") -> list[str]:
    """Fixed strings of the prompts, for the default tokenizer's training corpus."""
    out = [HISTORY_HEADER, ANSWER, " stars", " | "]
    for task in TASKS:
        out.append(build_prompt(task, "1. x\n2. y", category_word=category_word, item_title="x"))
    out.extend(f"{i}. " for i in range(1, 101))
    out.extend(f"{r} stars" for r in ("0.5", "1", "1.5", "2", "2.5", "3", "3.5", "4", "4.5", "5"))
    return out


@dataclass
class PromptRenderer:
    """Renders prompts/targets from a processed dataset (rows index its sorted event table).

    ds: a ``ProcessedDataset`` (uses ``ds.events`` — titles, categories and ratings per sorted event —
        and ``ds.vocabs["category"]`` to name FavGenre labels).
    text_events: how many of the window's last events to render as text (0 = none, None = all).
    """

    ds: object
    text_events: int | None = 0

    @property
    def category_word(self) -> str:
        return "genre" if getattr(self.ds, "name", "") in ("movielens", "synthetic") else "category"

    def event(self, row: int) -> tuple[str, float | None, tuple[str, ...]]:
        """(title, rating, categories) of sorted event ``row``."""
        ev = self.ds.events
        item = int(ev.item[row])
        return ev.items.titles[item], float(ev.rating[row]), tuple(ev.items.categories[item])

    def event_from_ids(self, item: int, rating: int) -> tuple[str, float | None, tuple[str, ...]]:
        """(title, rating, categories) of an event given by its item and rating vocab ids (a history that
        is not in the dataset, e.g. ``python -m userllm.generate --histories``)."""
        c = int(self.ds.item_index[item])
        token = self.ds.vocabs["rating"].token(rating) if rating > 0 else None
        items = self.ds.events.items
        return items.titles[c], (float(token) if token is not None else None), tuple(items.categories[c])

    def events_prompt(self, task: str, events: Sequence[tuple[str, float | None, Sequence[str]]],
                      item_title: str | None = None, question: str | None = None) -> str:
        """The prompt of a window of ``events`` (oldest first; the last ``text_events`` of them rendered as
        text); ``item_title``: the reviewed item (reviewg); ``question``: in place of the task's."""
        events = list(events)
        hist = None
        if self.text_events != 0:
            shown = events if self.text_events is None else events[len(events) - min(self.text_events,
                                                                                          len(events)):]
            hist = render_history(shown)
        return build_prompt(task, hist, category_word=self.category_word, item_title=item_title, question=question)

    def prompt(self, task: str, start: int, target_row: int) -> str:
        """The prompt of the example whose window is sorted rows ``[start, target_row)``."""
        title = self.event(target_row)[0] if task == "reviewg" else None
        first = start if self.text_events is None else max(start, target_row - self.text_events)
        if self.text_events == 0:
            first = target_row
        return self.events_prompt(task, [self.event(r) for r in range(first, target_row)], title)

    def prompts(self, task: str, starts: Sequence[int], rows: Sequence[int]) -> list[str]:
        return [self.prompt(task, int(s), int(r)) for s, r in zip(starts, rows)]


def corpus_texts(ds, max_reviews: int = 20000, seed: int = 0) -> list[str]:
    """Text for training the default tokenizer: titles, category names, rendered events, reviews, templates.

    Deterministic for a given dataset (reviews are subsampled with a fixed seed), so the tokenizer cache
    key is stable.
    """
    ev = ds.events
    items = ev.items
    cats = sorted({c for cs in items.categories for c in cs})
    texts = list(items.titles) + [target_text(t) for t in items.titles] + cats + [target_text(c) for c in cats]
    texts += [render_event(t, None, c) for t, c in zip(items.titles, items.categories)]
    for col in (ev.summary, ev.text):
        if col is None:
            continue
        idx = np.arange(len(col))
        if len(idx) > max_reviews:
            idx = np.sort(np.random.default_rng(seed).choice(len(idx), max_reviews, replace=False))
        texts += [str(col[i]) for i in idx if col[i]]
    texts += template_texts("genre") + template_texts("category")
    return texts
