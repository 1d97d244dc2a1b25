"""Scores of generated journey names against the references, and the printed tables.

Per pair (name, reference), both split into labels at commas and normalized (lower case, single spaces):

* ROUGE-1/2/L F1 (:func:`userllm.metrics.rouge`, the ``rouge-score`` package with stemming);
* ``exact``: 1 when some generated label equals some reference label;
* ``partial``: 1 when some word of the name occurs in some reference label (tokens are runs of letters
  and digits, as ROUGE tokenizes them).

Each is averaged over the journeys.
"""

from __future__ import annotations

import re
from typing import Sequence

from ..metrics import rouge
from .references import split_labels

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
NAME_COLUMNS = ROUGE_TYPES + ("exact", "partial")
_WORD = re.compile(r"[a-z0-9]+")


def name_scores(names: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """{"rouge1", "rouge2", "rougeL", "exact", "partial", "count"} (means over the pairs)."""
    if len(names) != len(references):
        raise ValueError(f"{len(names)} names but {len(references)} references")
    out = dict(rouge(names, references, ROUGE_TYPES)) if names else {t: 0.0 for t in ROUGE_TYPES}
    exact = partial = 0
    for name, ref in zip(names, references):
        got, want = set(split_labels(name)), set(split_labels(ref))
        exact += bool(got & want)
        want_words = {w for label in want for w in _WORD.findall(label)}
        partial += bool(set(_WORD.findall(name.lower())) & want_words)
    n = max(1, len(names))
    out.update(exact=exact / n, partial=partial / n, count=len(names))
    return out


def format_rows(rows: Sequence[dict], columns: Sequence[str], title: str) -> str:
    """A plain-text table: first column left aligned, numbers with 4 decimals (None -> "-")."""
    def fmt(v):
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) if i == 0 else v.rjust(w)  # noqa: E731
                                  for i, (v, w) in enumerate(zip(vals, width)))
    return "\n".join([title, line(list(columns))] + [line(row) for row in cells])
