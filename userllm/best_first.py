"""Exact constrained decoding: the K most likely catalogue entries by best-first search over the trie.

The constrained beam search (:func:`userllm.decoding.constrained_beam_search`) keeps the K best *prefixes*
at every step, and on NextItem that is far from the K best titles (issue 14, README "Session 9"). On a
session-6 recipe run (``runs/a-proj``) the beams' 10th title scored -58.6 on average over the 610 test
users; for the 6 users also ranked exhaustively, the beams' 10th scored -55.2 on average, the exhaustive
ranking's 10th -12.9. A title the readout names gets nearly all of its log-likelihood from the first
tokens (the choice of candidate), while a generic first token is likely because many titles start with
it and loses its probability only later; the beams fill with such prefixes. Whether the exact top K
*ranks better* is a question about the model, not the search: on that run it ranks worse (Recall@10
0.0098 against the beams' 0.0246), because the model's likeliest titles are short ones it writes for
anyone (README).

Best-first search finds the exact top K instead. Token log-probabilities are <= 0, so a prefix's
score bounds the score of every entry below it; a priority queue per example holds the frontier (prefixes
with their scores, and finished entries), and whatever is at its top is expanded (one forward of the
model gives the log-probs of all its children) until K finished entries have come out of the top: each
is then better than anything still in the queue, so they are the exact top K in order (the ranking by
:func:`userllm.diagnostics.catalogue_log_likelihoods`, which scores all ~9,700 titles per user, up to
float rounding).

Batched: every round pops up to ``per_round`` prefixes of each unfinished example and runs them appended
to the prompts' KV cache (:func:`userllm.decoding.prefix_logits`), in two forwards (prefixes of up to
``SHORT_PREFIX`` tokens and longer ones, so that few are padded). A finished entry
is taken only when it is popped before any prefix of that round (a prefix popped earlier in the round
may have a child that beats it). The extra prefixes of a round are speculative: at most ``per_round -
1`` expansions that sequential search would not have made, for ``per_round`` times fewer forwards.

``max_expansions`` bounds the work per example: an example that reaches it stops expanding and is filled
from the finished entries already in its queue, best first; it is counted in ``inexact`` and may hold
fewer than K entries.

Only for scores that never rise along a sequence (log-probabilities): contrastive scores
(:class:`~userllm.decoding.ContrastiveStepper`) are not bounded this way.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .decoding import Trie

#: Prefixes expanded per example and round, and the prefix length up to which they share a forward. Measured on
#: 32 users of the session-6 NextItem recipe, one thread (README "Session 9"): the mean prefix is ~2 tokens and a
#: few are 15+, so one forward padded to the round's longest ran 2.8x the real tokens. Rounds of 8 in one
#: forward: 27.2 s; of 8 / 16 in two forwards (<= 2 tokens, longer): 22.2 / 19.8-20.1 s; of 16 / 32 in
#: power-of-two length buckets: 24.8 / 20.8-22.7 s; of 16 in one forward: 26.9-27.1 s.
PER_ROUND = 16
SHORT_PREFIX = 2
#: Expansions after which an example stops searching (the trie of ml-latest-small has 91k nodes).
MAX_EXPANSIONS = 20000


@dataclass
class ExactSearchOutput:
    """Per example, its top entries best first (at most ``top_k``), their log-likelihoods, and the work done."""

    entries: list[list[int]]        # catalogue indices
    scores: list[list[float]]       # summed token log-probs
    expansions: list[int]           # prefixes expanded (model rows run) per example
    steps: int                      # model forwards run
    inexact: int = 0                # examples stopped by max_expansions


@torch.no_grad()
def best_first_search(stepper, logits: torch.Tensor, past, trie: Trie, top_k: int = 10, *,
                      per_round: int = PER_ROUND, max_expansions: int = MAX_EXPANSIONS) -> ExactSearchOutput:
    """The exact ``top_k`` catalogue entries of each of B examples by sequence log-likelihood.

    stepper: has ``prefix_logits(past, rows, input_ids, lengths) -> float [n, V]`` (:class:`HFStepper`,
    :class:`UserLLMStepper`); logits: float [B, V] next-token logits after each prompt (the prefill's);
    past: the prefill's state (left unchanged). Ties between equal scores are broken by discovery order.
    """
    if top_k < 1 or per_round < 1 or max_expansions < 1:
        raise ValueError(f"top_k, per_round and max_expansions must be >= 1, got {top_k}, {per_round}, "
                         f"{max_expansions}")
    B = logits.shape[0]
    eos, device = trie.eos_id, logits.device
    order = itertools.count()      # tie-breaker: heap entries never compare their prefixes
    # Heap items: (-score, order, node, prefix tokens, entry index or -1 for an unfinished prefix).
    heaps: list[list] = [[] for _ in range(B)]
    results: list[list[tuple[float, int]]] = [[] for _ in range(B)]
    expansions = [0] * B
    open_ = [True] * B

    def push_children(b: int, score: float, node: int, prefix: tuple, logp: torch.Tensor) -> None:
        kids = trie.children[node]
        tokens = list(kids)
        for tok, lp in zip(tokens, logp[tokens].tolist()):
            child = kids[tok]
            if tok == eos:
                heapq.heappush(heaps[b], (-(score + lp), next(order), child, prefix, trie.value[child]))
            else:
                heapq.heappush(heaps[b], (-(score + lp), next(order), child, prefix + (tok,), -1))

    root = F.log_softmax(logits.float(), dim=-1).cpu()
    for b in range(B):
        push_children(b, 0.0, 0, (), root[b])
        expansions[b] = 1
    steps = 0
    while True:
        batch: list[tuple[int, float, int, tuple]] = []
        for b in range(B):
            if not open_[b]:
                continue
            heap, taken, put_back = heaps[b], 0, []
            while heap and taken < per_round and len(results[b]) < top_k:
                item = heapq.heappop(heap)
                if item[4] >= 0:                      # a finished entry
                    if taken == 0:
                        results[b].append((-item[0], item[4]))
                    else:
                        put_back.append(item)
                    continue
                batch.append((b, -item[0], item[2], item[3]))
                taken += 1
            for item in put_back:
                heapq.heappush(heap, item)
            if len(results[b]) >= top_k or not heap and taken == 0:
                open_[b] = False
        if not batch:
            break
        # Two forwards, short and long prefixes (see PER_ROUND).
        short = [x for x in batch if len(x[3]) <= SHORT_PREFIX]
        long = [x for x in batch if len(x[3]) > SHORT_PREFIX]
        for group in (short, long):
            if not group:
                continue
            rows = torch.tensor([x[0] for x in group], device=device)
            lengths = torch.tensor([len(x[3]) for x in group], device=device)
            ids = torch.full((len(group), int(lengths.max())), eos, dtype=torch.long)
            for i, x in enumerate(group):
                ids[i, :len(x[3])] = torch.tensor(x[3])
            logp = F.log_softmax(stepper.prefix_logits(past, rows, ids.to(device), lengths).float(), dim=-1).cpu()
            steps += 1
            for (b, score, node, prefix), row in zip(group, logp):
                push_children(b, score, node, prefix, row)
                expansions[b] += 1
        for b in range(B):
            if open_[b] and expansions[b] >= max_expansions:
                open_[b] = False
    inexact = 0
    for b in range(B):
        if len(results[b]) < top_k and heaps[b] and expansions[b] >= max_expansions:
            inexact += 1
            finished = sorted((item for item in heaps[b] if item[4] >= 0), key=lambda item: item[:2])
            results[b] += [(-item[0], item[4]) for item in finished[:top_k - len(results[b])]]
    return ExactSearchOutput(entries=[[e for _, e in r] for r in results],
                             scores=[[s for s, _ in r] for r in results],
                             expansions=expansions, steps=steps, inexact=inexact)
