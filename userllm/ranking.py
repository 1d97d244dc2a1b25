"""Full-ranking next-item evaluation on the model's device (the protocol of :func:`userllm.metrics.label_ranks`).

Per batch of B users, on the device the model runs on (GPU when there is one):

* the model's scores float32 [B, I] are the only [B, I] float tensor: the label's score is read out
  (B values), then the excluded candidates are overwritten with NaN **in place** (UNK, the label
  itself, and with ``filter_seen`` the user's earlier items, scattered from the CSR history lists:
  O(history) work, no [B, I] mask is built);
* the rank is ``(scores >= label_score).sum(1)``, counted in place (``scores - label_score >= 0``, no
  [B, I] bool): NaN never compares true, so excluded candidates never
  count and ties count against the label (the pessimistic rule), exactly as ``label_ranks``;
* popularity is ranked once: ``base[j]`` = how many other real items score >= item j; with
  ``filter_seen`` a user's rank is ``base[label]`` minus its distinct earlier items that score >= the
  label (O(history) per user), so no [B, I] popularity matrix exists at all.

Why a comparison count and not ``topk``: Recall@k / NDCG@k need only the label's rank, and the count is
exact under ties, whereas ``topk``'s order among equal scores is unspecified.

Host memory stays flat over the batches because :func:`userllm.utils.memory.varying_shapes` pins
glibc's mmap threshold while ranking (without it the heap fragmented to a 5.7 GB peak on MovieLens-20M).

Peak device memory per batch: the model's activations + the scores (4 B x I bytes, the count reuses
them) + O(B x history) indices: 4 B x I bytes beyond the model, e.g. 27 MB at B = 256 and I = 27k (the
MovieLens-20M catalogue).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .data.examples import NextItemEval, collate
from .data.vocab import UNK_ID
from .metrics import metrics_from_ranks
from .loop import autocast, eval_mode
from .utils.memory import varying_shapes

KS = (1, 5, 10)
#: Candidates up to which a float32 sum of 0/1 counts exactly (2**24); wider catalogues count in int64.
MAX_EXACT_FLOAT_COUNT = 2 ** 24
#: Users per batch: 256 keeps the [B, I] buffers at ~35 MB for 27k items and the model's batch well filled.
EVAL_BATCH_SIZE = 256


def history_pairs(evalset: NextItemEval, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row [nnz], item id [nnz]) of the earlier items of examples ``idx`` (rows 0 .. len(idx) - 1)."""
    a, b = evalset.seen_offsets[idx], evalset.seen_offsets[idx + 1]
    counts = b - a
    row = np.repeat(np.arange(len(idx), dtype=np.int64), counts)
    flat = np.repeat(a - np.r_[0, np.cumsum(counts)[:-1]], counts) + np.arange(int(counts.sum()))
    return row, evalset.seen_items[flat]


def rank_in_place(scores: torch.Tensor, labels: torch.Tensor, seen: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """int64 [B]: each label's 0-based rank among the candidates; **overwrites** ``scores``.

    scores: float32 [B, I] (overwritten: scratch space of the count); labels: int64 [B] in [1, I);
    seen: (row [nnz], item [nnz]) int64 of items to exclude (the label stays a candidate: it is excluded
    as its own competitor anyway). Equals ``label_ranks(scores, labels, mask)`` with ``mask`` the dense
    bool [B, I] of ``seen``.
    """
    rows = torch.arange(len(labels), device=scores.device)
    target = scores[rows, labels].clone()
    scores[:, UNK_ID] = float("nan")
    if seen is not None:
        scores[seen[0], seen[1]] = float("nan")
    scores[rows, labels] = float("nan")
    if scores.shape[1] >= MAX_EXACT_FLOAT_COUNT:
        return (scores >= target[:, None]).sum(dim=1, dtype=torch.int64)
    # In place, no [B, I] bool: s - t >= 0 exactly when s >= t (the difference of two distinct floats is
    # never rounded to 0, and NaN stays false), and a float32 sum of 0/1 values is exact below 2**24.
    # Measured (benchmarks/ranking_check.py count, 1 thread, 256 x 26,739): 10.7 ms against 50 ms for the
    # bool sum, which accumulates in int64 (15.6 ms with an int32 accumulator).
    return scores.sub_(target[:, None]).ge_(0).sum(dim=1).to(torch.int64)


class PopularityRanks:
    """Ranks of a fixed score vector (the popularity baseline) for any labels, computed once.

    scores: float [I] (index = item id; UNK never counts). ``base[j]`` = the number of real items k != j
    with ``scores[k] >= scores[j]``.
    """

    def __init__(self, scores: torch.Tensor, device: torch.device | str = "cpu"):
        self.scores = scores.to(device=device, dtype=torch.float32)
        real = self.scores[UNK_ID + 1:]
        ordered = torch.sort(real).values
        at_least = len(real) - torch.searchsorted(ordered, self.scores, side="left")  # real k with s_k >= s_j
        self.base = at_least - 1                                                      # minus j itself

    def ranks(self, labels: torch.Tensor, seen: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """int64 [B]: the labels' ranks; ``seen`` (row, item) pairs are removed from each row's candidates."""
        ranks = self.base[labels].clone()
        if seen is not None:
            row, item = seen
            keep = (item != UNK_ID) & (item != labels[row])
            row, item = row[keep], item[keep]
            I = len(self.scores)
            pair = torch.unique(row * I + item)                   # a re-watched item is one candidate
            row, item = pair // I, pair % I
            better = self.scores[item] >= self.scores[labels[row]]
            ranks -= torch.bincount(row[better], minlength=len(labels))
        return ranks


@torch.inference_mode()
def evaluate_next_item(encoder, ds, evalset: NextItemEval, idx: np.ndarray, device: torch.device | str,
                       filter_seen: bool, popularity: torch.Tensor | None = None,
                       batch_size: int = EVAL_BATCH_SIZE, ks: Sequence[int] = KS) -> dict[str, dict]:
    """{"encoder": metrics, ["popularity": metrics]} over examples ``idx`` of ``evalset``, ranked on ``device``.

    encoder: has ``score_next(features, lengths) -> float [B, I]``; popularity: float [I] item scores
    (e.g. train counts) or None. Examples whose label is UNK are skipped (an UNK target cannot be ranked).
    Metrics: Recall@k for ``ks``, NDCG@10 and the count (:func:`userllm.metrics.metrics_from_ranks`).
    """
    with varying_shapes():
        return _evaluate_next_item(encoder, ds, evalset, idx, torch.device(device), filter_seen, popularity,
                                   batch_size, ks)


def _evaluate_next_item(encoder, ds, evalset: NextItemEval, idx: np.ndarray, device: torch.device,
                        filter_seen: bool, popularity: torch.Tensor | None, batch_size: int,
                        ks: Sequence[int]) -> dict[str, dict]:
    idx = np.asarray(idx, dtype=np.int64)
    idx = idx[evalset.examples.labels[idx] > 0]
    pop = PopularityRanks(popularity, device) if popularity is not None else None
    ranks: dict[str, list[torch.Tensor]] = {"encoder": [], "popularity": []}
    with eval_mode(encoder):
        for a in range(0, len(idx), batch_size):
            b = idx[a:a + batch_size]
            batch = collate(ds, evalset.examples, b).to(device)
            seen = None
            if filter_seen:
                row, item = history_pairs(evalset, b)
                seen = (torch.from_numpy(row).to(device), torch.from_numpy(item).to(device))
            with autocast(device):
                scores = encoder.score_next(batch.features, batch.lengths)
            ranks["encoder"].append(rank_in_place(scores.float(), batch.labels, seen).cpu())
            if pop is not None:
                ranks["popularity"].append(pop.ranks(batch.labels, seen).cpu())
    return {k: metrics_from_ranks(torch.cat(v), ks) for k, v in ranks.items() if v}
