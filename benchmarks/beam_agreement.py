"""Which of the encoder's candidates the User-LLM's beams hold (issue 14's readout runs).

    python benchmarks/beam_agreement.py RUN_DIR [--users 200] [--ranks 0,1,2,4,9] [--prior-weight W] [--decoder exact]

For each rank r (0 = the encoder's first), the share of test users whose LLM beam search (the run's own
constrained decoder and beam width) has the encoder's r-th next-item candidate among its 10 beams: the
Recall@10 of the beams with that candidate as the label. The encoder is the run's own (``score_next``
after each test window; UNK never a candidate). The beams are decoded once and scored against every rank.
Prints one JSON line {rank: share}.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from userllm.data.examples import collate, make_examples
from userllm.decoding import DECODERS
from userllm.evaluation import eval_subset, generate_and_score
from userllm.factory import load_run


def agreement(entries, candidates: np.ndarray, label_to_entry: np.ndarray, ranks, k: int = 10) -> dict[int, float]:
    """{rank r: share of examples whose first ``k`` decoded entries hold the item ``candidates[i, r]``}.

    entries: per example, decoded catalogue indices best first; candidates: int [N, R] item vocab ids;
    label_to_entry: item vocab id -> catalogue index (-1: no entry, never held)."""
    out = {}
    for r in ranks:
        want = label_to_entry[candidates[:, r]]
        out[r] = round(float(np.mean([w >= 0 and w in list(e)[:k] for w, e in zip(want, entries)])), 4)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--users", type=int, default=200, help="first N test users of the evaluation subset")
    ap.add_argument("--ranks", default="0,1,2,4,9", help="encoder ranks, 0-based, comma-separated")
    ap.add_argument("--prior-weight", type=float, default=None,
                    help="the decoder's W in log p(title | user) - W log p(title | no history) (default: the run's)")
    ap.add_argument("--decoder", choices=DECODERS, default="beam",
                    help="beam search, or the exact top 10 by best-first search (userllm.best_first)")
    a = ap.parse_args(argv)
    run = load_run(a.run_dir, threads=1)
    ranks = [int(r) for r in a.ranks.split(",")]
    ex = eval_subset(make_examples(run.ds, run.cfg.task, run.cfg.window, "test"), a.users)
    batch = collate(run.ds, ex, np.arange(len(ex.labels)))
    with torch.no_grad():
        scores = run.model.encoder.score_next(batch.features, batch.lengths).float()
    scores[:, 0] = float("-inf")
    top = scores.topk(max(ranks) + 1, dim=-1).indices.numpy()
    m = generate_and_score(run.model, run.batcher, run.ds, ex, beams=run.cfg.beams, device=run.device,
                           amp=run.amp, disable_progress=True, keep_entries=True,
                           prior_weight=run.cfg.prior_weight if a.prior_weight is None else a.prior_weight,
                           decoder=a.decoder)
    print(json.dumps(agreement(m["entries"], top, run.batcher.catalogue.label_to_entry, ranks)))


if __name__ == "__main__":
    main()
