"""A user's timeline as a PNG: one lane per journey (named on the y axis), events as dots coloured by
journey, the transient events in grey in a bottom lane."""

from __future__ import annotations

import datetime as dt
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

LABEL_WIDTH = 38          # characters per line of a lane label before it wraps
MAX_LANES = 8             # journeys drawn in their own lane; a 41-journey user was unreadable on one page
TRANSIENT = "transient (no journey)"


def plot_timeline(path: str | Path, timestamps: np.ndarray, labels: np.ndarray, names: Sequence[str],
                  title: str) -> Path:
    """Write the timeline of one user.

    timestamps: int64 [n] event times (seconds); labels: int64 [n] journey index per event (-1 =
    transient); names: one lane label per journey (index order = lane order, top to bottom; lines longer
    than LABEL_WIDTH characters wrap, "\n" starts a new line). Journeys after the first MAX_LANES share
    one grey lane.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    rest = len(names) - MAX_LANES
    if rest > 0:
        labels = np.where(labels >= MAX_LANES, MAX_LANES, labels)
        names = list(names[:MAX_LANES]) + [f"{rest} more journeys"]
    k = len(names)
    lanes = ["\n".join(textwrap.fill(line, LABEL_WIDTH) for line in f"{i + 1}. {n}".split("\n"))
             for i, n in enumerate(names)] + [TRANSIENT]
    if rest > 0:
        lanes[MAX_LANES] = names[MAX_LANES]
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.55 * (k + 1)))
    when = np.array([dt.datetime.fromtimestamp(int(t), dt.timezone.utc) for t in timestamps])
    # tab10 without its grey (index 7), which is the transient / "more journeys" colour here.
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]
    rng = np.random.default_rng(0)
    for lane in range(k + 1):
        j = lane if lane < k else -1
        sel = labels == j
        if not sel.any():
            continue
        y = (k - lane) + rng.uniform(-0.18, 0.18, size=int(sel.sum()))   # jitter: same-day events stay visible
        grey = j < 0 or (rest > 0 and j == MAX_LANES)
        ax.scatter(when[sel], y, s=18, alpha=0.75, color="0.65" if grey else palette[lane % len(palette)],
                   edgecolors="none")
    ax.set_yticks(range(k, -1, -1), lanes, fontsize=9)
    ax.set_ylim(-0.6, k + 0.6)
    ax.xaxis.set_major_locator(mdates.AutoDateLocator())
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
