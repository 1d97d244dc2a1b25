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

On the CPU, the AR encoder's ranking never materialises the [B, I] scores (:func:`rank_tiled`): its
query and head (``next_item_query``) are multiplied 2,048 items at a time into one reused [B, 2048]
buffer, which is NaN-excluded and counted while it is in cache. The ranks are the same bit for bit (the
tile GEMM gives the same values as the full one); the full product wrote 27 MB per batch and read it back
three times, and a [256, 26,739] ``addmm`` alone took 41-61 ms against 15-21 ms in tiles (1 thread,
``benchmarks/ranking_check.py gemm``).
Batches group users of similar history length, so that short histories are padded only to their batch's
longest. This is not bit-exact: the padded length changes the last bits of the encoder's attention,
and 12 of 20,000 MovieLens-20M ranks (all of users shorter than the window) moved by one; the metrics of
all 138,493 users stayed the same to the last digit (benchmarks/RESULTS.md, issue 10 third phase).

Why a comparison count and not ``topk``: Recall@k / NDCG@k need only the label's rank, and the count is
exact under ties, whereas ``topk``'s order among equal scores is unspecified.

Host memory stays flat over the batches: the tiled CPU path allocates no [B, I] tensor, and the untiled
path runs under :func:`userllm.utils.memory.varying_shapes`, which pins glibc's mmap threshold (without
it the [B, I] scores fragmented the heap to a 5.7 GB peak on MovieLens-20M).

Peak device memory per batch: the model's activations + the scores (4 B x I bytes, the count reuses
them) + O(B x history) indices: 4 B x I bytes beyond the model, e.g. 27 MB at B = 256 and I = 27k (the
MovieLens-20M catalogue); on the CPU's tiled path 4 B x 2,048 bytes (2 MB) instead of 4 B x I.
"""

from __future__ import annotations

import contextlib
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
#: Users per batch: 256 keeps the [B, I] buffers at ~35 MB for 27k items and the model's batch well filled;
#: the fastest of 64-1,024 for the tiled CPU ranking (benchmarks/ranking_check.py batch-sizes, RESULTS.md).
EVAL_BATCH_SIZE = 256
#: Items per tile of :func:`rank_tiled`: [256, 2048] float32 is 2 MB, which stays in cache between the GEMM
#: and the count (measured in benchmarks/RESULTS.md, issue 10 third phase).
SCORE_TILE = 2048


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
    return count_at_least_(scores, target).to(torch.int64)


def count_at_least_(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """float32 [B]: how many entries of each row of ``scores`` (float32 [B, N], N < 2**24; **overwritten**)
    are >= that row's ``target`` (float32 [B]); NaN entries never count.

    In place, no [B, N] bool: s - t >= 0 exactly when s >= t (the difference of two distinct floats is
    never rounded to 0, and NaN stays false), and a float32 sum of 0/1 values is exact below 2**24.
    Measured (benchmarks/ranking_check.py count, 1 thread, 256 x 26,739): 10.7 ms against 50 ms for the
    bool sum, which accumulates in int64 (15.6 ms with an int32 accumulator).
    """
    return scores.sub_(target[:, None]).ge_(0).sum(dim=1)


def rank_tiled(query: torch.Tensor, table: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
               seen: tuple[torch.Tensor, torch.Tensor] | None = None, tile: int = SCORE_TILE) -> torch.Tensor:
    """int64 [B]: ``rank_in_place(torch.addmm(bias, query, table.t()), labels, seen)`` without the [B, I] scores.

    query: float32 [B, D]; table: float32 [I, D]; bias: float32 [I]; labels: int64 [B] in [1, I); seen as
    in :func:`rank_in_place`. The scores are computed ``tile`` items at a time into one reused [B, tile]
    buffer (``addmm(out=)``), the excluded candidates of that tile set to NaN and the tile counted in place
    while it is still in cache. Each label's score comes from a [B, B] ``addmm`` against the labels' own
    rows (its diagonal); it is checked against the value the tile GEMM gives at the label, and the batch
    falls back to the full [B, I] product if any differs (a BLAS whose result depends on the GEMM's shape:
    none measured: MKL on AVX2 gives the same bits for tiles of 512-4096 and the [B, B] diagonal, B >= 2).
    """
    B, I = query.shape[0], table.shape[0]
    if B < 2 or I >= MAX_EXACT_FLOAT_COUNT:      # B = 1 is a GEMV (other bits); huge I: rank_in_place's int path
        return rank_in_place(torch.addmm(bias, query, table.t()), labels, seen)
    rows = torch.arange(B, device=query.device)
    target = torch.addmm(bias[labels], query, table[labels].t()).diagonal().clone()
    # The excluded (row, item) pairs, grouped by tile: UNK, the seen items and each label itself.
    parts_row, parts_item = [rows, rows], [torch.full_like(labels, UNK_ID), labels]
    if seen is not None:
        parts_row.append(seen[0])
        parts_item.append(seen[1])
    ex_item, order = torch.sort(torch.cat(parts_item))
    ex_row = torch.cat(parts_row)[order]
    edges = torch.arange(0, I + tile, tile, device=query.device).clamp_max(I)
    bounds = torch.searchsorted(ex_item, edges).tolist()
    label_tile = labels // tile
    got = torch.empty_like(target)
    buf = query.new_empty(B, min(tile, I))
    count = query.new_zeros(B)
    for j, a in enumerate(range(0, I, tile)):
        s = buf[:, :min(tile, I - a)]
        torch.addmm(bias[a:a + s.shape[1]], query, table[a:a + s.shape[1]].t(), out=s)
        here = (label_tile == j).nonzero().squeeze(1)
        got[here] = s[here, labels[here] - a]
        lo, hi = bounds[j], bounds[j + 1]
        s[ex_row[lo:hi], ex_item[lo:hi] - a] = float("nan")
        count += count_at_least_(s, target)          # exact: count < I < 2**24
    if not torch.equal(got, target):
        return rank_in_place(torch.addmm(bias, query, table.t()), labels, seen)
    return count.to(torch.int64)


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
    ranks = next_item_ranks(encoder, ds, evalset, idx, device, filter_seen, popularity, batch_size)
    return {k: metrics_from_ranks(v, ks) for k, v in ranks.items()}


@torch.inference_mode()
def next_item_ranks(encoder, ds, evalset: NextItemEval, idx: np.ndarray, device: torch.device | str,
                    filter_seen: bool, popularity: torch.Tensor | None = None,
                    batch_size: int = EVAL_BATCH_SIZE) -> dict[str, torch.Tensor]:
    """{"encoder": int64 [n], ["popularity": int64 [n]]}: the 0-based ranks of the examples ``idx`` whose
    label is not UNK, in the order of ``idx`` (CPU tensors; empty dict when there are none).

    On the CPU, an encoder with ``next_item_query`` (the AR encoder) is ranked by :func:`rank_tiled`;
    otherwise ``score_next`` is ranked by :func:`rank_in_place`. Batches group users of similar history
    length (each batch is padded only to its own longest window).
    """
    device = torch.device(device)
    tiled = device.type == "cpu" and hasattr(encoder, "next_item_query")
    # Only the [B, I] scores of the untiled path fragment glibc's heap (varying_shapes); the tiled path
    # keeps the allocator as it is: pinning the mmap threshold there page-faults every activation of the
    # encoder (6.3-6.6 CPU s against 4.1-5.5 for the first 10,240 MovieLens-20M users; benchmarks/RESULTS.md).
    with contextlib.nullcontext() if tiled else varying_shapes():
        return _next_item_ranks(encoder, ds, evalset, np.asarray(idx, dtype=np.int64), device,
                                filter_seen, popularity, batch_size, tiled)


def _next_item_ranks(encoder, ds, evalset: NextItemEval, idx: np.ndarray, device: torch.device,
                     filter_seen: bool, popularity: torch.Tensor | None, batch_size: int,
                     tiled: bool) -> dict[str, torch.Tensor]:
    idx = idx[evalset.examples.labels[idx] > 0]
    # Users sorted by window length, so that collate pads a batch only to its own longest window (31% of
    # MovieLens-20M's test windows are shorter than 50); the ranks are put back in the order of ``idx``.
    by_length = np.argsort(evalset.examples.target[idx] - evalset.examples.start[idx], kind="stable")
    pop = PopularityRanks(popularity, device) if popularity is not None else None
    ranks: dict[str, list[torch.Tensor]] = {"encoder": [], "popularity": []}
    with eval_mode(encoder):
        for a in range(0, len(idx), batch_size):
            b = idx[by_length[a:a + batch_size]]
            batch = collate(ds, evalset.examples, b).to(device)
            seen = None
            if filter_seen:
                row, item = history_pairs(evalset, b)
                seen = (torch.from_numpy(row).to(device), torch.from_numpy(item).to(device))
            if tiled:       # CPU: score and count in cache-sized tiles, no [B, I] scores
                query, table, bias = encoder.next_item_query(batch.features, batch.lengths)
                ranks["encoder"].append(rank_tiled(query.float(), table.float(), bias.float(), batch.labels, seen))
            else:
                with autocast(device):
                    scores = encoder.score_next(batch.features, batch.lengths)
                ranks["encoder"].append(rank_in_place(scores.float(), batch.labels, seen).cpu())
            if pop is not None:
                ranks["popularity"].append(pop.ranks(batch.labels, seen).cpu())
    unsort = torch.from_numpy(np.argsort(by_length))
    return {k: torch.cat(v)[unsort] for k, v in ranks.items() if v}
