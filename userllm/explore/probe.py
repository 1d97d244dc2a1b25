"""How learnable is the aligned LLM's task at all? A logistic-regression probe on simple features.

``python -m userllm.explore.probe`` (the options of ``python -m userllm.explore``; it reads the encoder
pretraining from the cache when a run already made it, else pretrains it) builds the clusters and novel
transitions of ``--seed`` exactly as a run does, and fits scikit-learn logistic regressions on the
training users' pairs, evaluated on every novel transition of the held-out users. Three tasks:

* ``feedback``: the observed transitions only, label = positive feedback (the ``--aligned-negatives 0``
  training set of the aligned LLM);
* ``went-to``: the observed transition (1) against ``--aligned-negatives`` (at least 1) other new clusters
  of that user drawn by ``--negative-sampling`` (0);
* ``aligned``: the aligned LLM's own labels on those pairs: yes iff went-to and positive.

Features of a (context, candidate) pair (sets, each also alone): ``cluster`` = the candidate's one-hot [K]
(a per-cluster prior, the training users' positive rate of it as logistic regression sees it); ``ratings``
= the window's mean rating, share rated >= --rating-threshold and share of rated events [3] (one number
per user: useful for the pooled AUC, useless for choosing among one user's candidates); ``recent`` = the
window's clusters multi-hot [K] and its outer product with the candidate one-hot [K*K]; ``encoder`` = the
pretrained encoder's log-probability that the next item lies in the candidate cluster [1] and the user
embedding (its last hidden state) [D].

Each regression's L2 strength is chosen among :data:`REGULARISATION` on a fifth of the training users.
Metrics on the held-out pairs: ``auc`` (pooled), ``group_auc`` (the mean over contexts of the AUC among one
context's pairs, contexts with both labels only: what best-of-n selection needs, since it compares one
user's candidates), ``log_loss`` and ``base_log_loss`` (always answering the training base rate). The
aligned LLM's own held-out AUC (``aligned_training.heldout`` in a run's metrics) compares with these rows.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import torch

from ..data.examples import gather_windows
from ..config import opt
from .config import ExploreConfig
from .pairs import auc, draw_pairs, group_auc, negative_weight

TASKS = ("feedback", "went-to", "aligned")


@dataclass
class ProbeConfig(ExploreConfig):
    """The options of ``python -m userllm.explore`` and which probe to run."""

    PROG: ClassVar[str] = "python -m userllm.explore.probe"
    probe: str = opt("features", "features: the logistic-regression table; aligned: train and measure only "
                     "the aligned LLM", choices=("features", "aligned"))
FEATURE_SETS = ("cluster", "ratings", "recent", "encoder", "all")
REGULARISATION = (0.001, 0.01, 0.1, 1.0)          # inverse L2 strengths C tried (module docstring)


@torch.no_grad()
def context_features(ds, encoder, rows: np.ndarray, window: int, threshold: float, item_cluster: np.ndarray,
                     k: int, batch: int = 256) -> dict[str, np.ndarray]:
    """Per context (the window before each sorted-event row in ``rows``): ``ratings`` float [n, 3],
    ``cluster_logp`` float [n, K] (the encoder's log-probability of the next item's cluster) and ``user``
    float [n, D] (its last hidden state)."""
    rating = np.asarray(ds.events.rating, dtype=np.float64)
    win = rating[rows[:, None] - window + np.arange(window)[None, :]]                  # [n, window]
    rated = ~np.isnan(win)
    mean = np.where(rated.any(1), np.nansum(win, 1) / np.maximum(rated.sum(1), 1), np.nan)
    fill = np.nanmean(mean) if np.isfinite(mean).any() else 0.0
    ratings = np.stack([np.nan_to_num(mean, nan=fill), (np.nan_to_num(win, nan=-np.inf) >= threshold).mean(1),
                        rated.mean(1)], 1)
    device = next(encoder.parameters()).device
    onehot = torch.zeros(len(item_cluster), k)
    onehot[np.flatnonzero(item_cluster >= 0), item_cluster[item_cluster >= 0]] = 1.0
    logp, user = [], []
    for a in range(0, len(rows), batch):
        r = rows[a:a + batch]
        feats, lengths = gather_windows(ds, r - window, r)
        feats, lengths = [f.to(device) for f in feats], lengths.to(device)
        lp = torch.log_softmax(encoder.score_next(feats, lengths).cpu(), -1)                 # [B, V]
        logp.append(torch.logsumexp(lp[:, :, None] + torch.log(onehot)[None], 1).numpy())  # [B, K]
        user.append(encoder.last_hidden(feats, lengths).float().cpu().numpy())
    return {"ratings": ratings, "cluster_logp": np.concatenate(logp), "user": np.concatenate(user)}


def pair_features(names: str, cf: dict, recent_hot: np.ndarray, ctx: np.ndarray, cand: np.ndarray, k: int
                  ) -> np.ndarray:
    """float [P, F]: the feature set ``names`` (module docstring) of pairs (ctx [P], cand [P])."""
    use = FEATURE_SETS[:-1] if names == "all" else (names,)
    cols = []
    onehot = np.eye(k)[cand]
    if "cluster" in use:
        cols.append(onehot)
    if "ratings" in use:
        cols.append(cf["ratings"][ctx])
    if "recent" in use:
        r = recent_hot[ctx]
        cols += [r, (r[:, :, None] * onehot[:, None, :]).reshape(len(ctx), k * k)]
    if "encoder" in use:
        cols += [cf["cluster_logp"][ctx, cand][:, None], cf["user"][ctx]]
    return np.concatenate(cols, 1)


def standardised(x: np.ndarray, fit: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``x[rows]`` with its non-binary columns standardised on ``x[fit]``. Binary (one-hot) columns are
    left as they are: scaled by their training std, a rare interaction column becomes ~100 on the held-out
    pairs where it is 1 (held-out log-loss 0.79 against 0.70 for the base rate on ml-latest-small)."""
    ref = x[fit]
    binary = np.all((ref == 0) | (ref == 1), 0)
    mean = np.where(binary, 0.0, ref.mean(0))
    std = np.where(binary, 1.0, np.maximum(ref.std(0), 1e-12))
    return (x[rows] - mean) / std


def feature_probe(cfg: ExploreConfig, shared, sd, log=print) -> dict:
    """The logistic-regression rows (module docstring) for one seed's data ``sd`` (:func:`.run.seed_data`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    ds, K = shared.ds, sd.clusters.k
    # train and held-out transitions side by side: contexts 0 .. n_train - 1 are the training users'
    tr = [sd.train_tr, sd.heldout_tr]
    rows_, cluster, positive = (np.concatenate([getattr(t, f) for t in tr]) for f in ("row", "cluster", "positive"))
    is_test = np.r_[np.zeros(len(sd.train_tr), bool), np.ones(len(sd.heldout_tr), bool)]
    user = np.concatenate([t.user for t in tr])
    fit_users = np.unique(sd.train_tr.user)
    recent_hot = np.zeros((len(rows_), K))
    win = sd.ec[rows_[:, None] - cfg.window + np.arange(cfg.window)[None, :]]
    for j in range(cfg.window):
        ok = win[:, j] >= 0
        recent_hot[np.flatnonzero(ok), win[ok, j]] = 1.0
    allowed = [np.flatnonzero(h == 0).tolist() for h in recent_hot]
    cf = context_features(ds, shared.encoder, rows_, cfg.window, cfg.rating_threshold, sd.clusters.item_cluster, K)
    weight = negative_weight(sd.train_tr.cluster, K, cfg.negative_sampling)
    m = max(1, cfg.aligned_negatives)
    pctx, pcand, went = draw_pairs(np.arange(len(rows_)), cluster, allowed, m, weight,
                                   np.random.default_rng([cfg.seed, 31]))
    labels = {"feedback": (went, positive[pctx]), "went-to": (np.ones_like(went), went),
              "aligned": (np.ones_like(went), went & positive[pctx])}
    rows = []
    for task in TASKS:
        keep, y = labels[task]
        keep = keep.astype(bool)
        c, k_, y = pctx[keep], pcand[keep], y[keep].astype(bool)
        train, test = ~is_test[c], is_test[c]
        base = y[train].mean()
        base_ll = log_loss(y[test], np.full(test.sum(), base), labels=[0, 1])
        # the regularisation C chosen on a fifth of the training users: on ml-latest-small seed 0 it
        # picked 0.01-0.1 for 14 of the 15 regressions (0.001 once), never sklearn's default 1
        val = train & np.isin(user[c], fit_users[::5])
        fit = train & ~val
        for names in FEATURE_SETS:
            x = pair_features(names, cf, recent_hot, c, k_, K)
            best = None
            for C in REGULARISATION:
                model = LogisticRegression(C=C, max_iter=500).fit(standardised(x, fit, fit), y[fit])
                ll = log_loss(y[val], model.predict_proba(standardised(x, fit, val))[:, 1], labels=[0, 1])
                best = (ll, C) if best is None or ll < best[0] else best
            model = LogisticRegression(C=best[1], max_iter=500).fit(standardised(x, train, train), y[train])
            p = model.predict_proba(standardised(x, train, test))[:, 1]
            rows.append({"task": task, "features": names, "C": best[1], "train_pairs": int(train.sum()),
                         "test_pairs": int(test.sum()), "base_rate": float(base), "auc": auc(p, y[test]),
                         "group_auc": group_auc(p, y[test], c[test]),
                         "log_loss": float(log_loss(y[test], p, labels=[0, 1])), "base_log_loss": float(base_ll)})
            log(format_row(rows[-1]))
    return {"seed": cfg.seed, "clusters": K, "negatives": m, "negative_sampling": cfg.negative_sampling,
            "rows": rows}


def probe(cfg: "ProbeConfig", log=print) -> dict:
    """``--probe features``: :func:`feature_probe`; ``--probe aligned``: only the aligned LLM of a run
    (``--aligned-*`` options), trained and measured on held-out pairs as a run does (a cheap way to compare
    its configurations: no novelty LLM, no best-of-n evaluation)."""
    from ..factory import check_paths
    from ..loop import seed_everything
    from .models import Prompts
    from .run import build_aligned, fit_aligned, prepare, seed_data

    check_paths(cfg.train_config(cfg.seed))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    shared = prepare(cfg, None, log)
    seed_everything(cfg.seed)
    sd = seed_data(cfg, cfg.seed, shared, log)
    if cfg.probe == "features":
        return feature_probe(cfg, shared, sd, log)
    prompts = Prompts(sd.clusters.labels, shared.tok, cfg.prompt_clusters)
    aligned = build_aligned(cfg, cfg.seed, shared, prompts, sd.clusters)
    return {"seed": cfg.seed, "aligned_training": fit_aligned(aligned, cfg, cfg.seed, sd, log)}


def format_row(r: dict) -> str:
    g = "-" if r["group_auc"] is None else f"{r['group_auc']:.3f}"
    return (f"| {r['task']} | {r['features']} | {r['train_pairs']} / {r['test_pairs']} | {r['base_rate']:.3f} | "
            f"{r['auc']:.3f} | {g} | {r['log_loss']:.4f} | {r['base_log_loss']:.4f} |")


HEADER = ("| task | features | pairs train / test | base rate | AUC | group AUC | log-loss | base log-loss |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")


def main(argv: Sequence[str] | None = None) -> int:
    from pathlib import Path

    from ..cli import user_errors
    from ..config import parse_config
    from ..utils.atomic import write_json

    cfg = parse_config(argv, cls=ProbeConfig)
    cfg.check()
    t0 = time.time()
    with user_errors():
        result = probe(cfg, log=lambda s: print(s, file=sys.stderr))
    if "rows" in result:
        print(HEADER)
        for r in result["rows"]:
            print(format_row(r))
    else:
        print(json.dumps(result["aligned_training"]))
    print(f"({time.time() - t0:.0f} s)")
    if cfg.out:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(cfg.out) / "probe.json", result)
    return 0


if __name__ == "__main__":
    from ..cli import run_cli

    raise SystemExit(run_cli(main))
