"""The user-aligned LLM learns a planted feedback rule (held-out AUC well above chance), and the pair
metrics that say so."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from userllm.explore.config import ExploreConfig
from userllm.explore.models import Prompts
from userllm.explore.pairs import auc, draw_pairs, group_auc, pair_metrics
from userllm.explore.run import build_aligned, fit_aligned, prepare, seed_data


def test_auc_and_group_auc_count_ties_half_and_skip_one_label_groups():
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == 0.75
    assert auc(np.array([1.0, 1.0]), np.array([0, 1], bool)) == 0.5
    assert auc(np.array([1.0, 2.0]), np.array([1, 1], bool)) is None
    # group 0: perfect; group 1: reversed; group 2: one label only (left out)
    score = np.array([2.0, 1.0, 1.0, 2.0, 5.0])
    label = np.array([1, 0, 1, 0, 1], bool)
    assert group_auc(score, label, np.array([0, 0, 1, 1, 2])) == 0.5
    # a per-group constant added to a score changes the pooled AUC, not the within-group one
    m = pair_metrics(score + np.array([0, 0, -9, -9, 0]), np.array([0, 0, 1, 1, 2]), label, np.ones(5, bool))
    assert m["group_auc"] == 0.5 and m["auc"] == pytest.approx(4 / 6)


def test_draw_pairs_puts_the_target_first_and_negatives_among_the_allowed():
    rng = np.random.default_rng(0)
    allowed = [[0, 1, 2, 3], [1, 4]]
    ctx, cand, went = draw_pairs([0, 1], np.array([2, 4]), allowed, 2, np.ones(5), rng)
    assert ctx.tolist() == [0, 0, 0, 1, 1] and went.tolist() == [True, False, False, True, False]
    assert cand[0] == 2 and set(cand[1:3]) <= {0, 1, 3} and cand[1] != cand[2] and cand[4] == 1


# Measured (2026-12-01, this tiny setting, liked-vs-not AUC): the answer head reaches 0.58-0.65 after 60
# steps at any of 3e-4 / 1e-3 / 3e-3 / 1e-2 (1e-2 collapses to a constant score), 0.83 after 120 steps and
# 1.00 after 300 at 3e-3; the user head reaches 1.00 after 60 steps.
@pytest.mark.parametrize("head, steps", [("answer", 150), ("user", 60)])
def test_aligned_llm_learns_a_planted_feedback_rule(tmp_path, head, steps):
    """Feedback planted as 'positive iff the candidate cluster is one of the first half': after a short
    training the held-out AUC of liked vs not must be clearly above chance (it stays near 0.5 when the
    aligned LLM learns nothing, as it did on ml-latest-small at the shared 3e-3 learning rate)."""
    cfg = ExploreConfig(synthetic_users=120, synthetic_items=60, synthetic_events=30, window=4, clusters=6,
                        follow_up=2, pretrain_steps=4, pretrain_window=8, encoder_dim=16, encoder_layers=1,
                        llm_hidden=32, llm_layers=1, tokenizer_vocab=400, llm_pretrain_steps=0, aligned_steps=steps,
                        aligned_negatives=0, aligned_lr=3e-3, aligned_head=head, batch_size=16,
                        aligned_eval_contexts=200, threads=1, cache_dir=str(tmp_path))
    shared = prepare(cfg, tmp_path, log=lambda s: None)
    sd = seed_data(cfg, 0, shared, log=lambda s: None)
    half = sd.clusters.k // 2
    for tr in (sd.train_tr, sd.heldout_tr, sd.test_tr):
        tr.positive = tr.cluster < half
    aligned = build_aligned(cfg, 0, shared, Prompts(sd.clusters.labels, shared.tok), sd.clusters)
    held = fit_aligned(aligned, cfg, 0, sd, log=lambda s: None)["heldout"]
    assert held["contexts"] >= 100
    assert held["feedback_auc"] > 0.75, held


def test_probe_finds_a_planted_per_cluster_rule_and_not_in_the_ratings(tmp_path):
    from userllm.explore.probe import feature_probe, standardised

    x = np.array([[0.0, 1.0, 5.0], [1.0, 0.0, 7.0], [0.0, 0.0, 9.0]])
    z = standardised(x, np.array([0, 1, 2]), np.array([0, 1, 2]))
    assert np.array_equal(z[:, :2], x[:, :2]) and z[:, 2].mean() == pytest.approx(0) and z[:, 2].std() == pytest.approx(1)
    cfg = ExploreConfig(synthetic_users=120, synthetic_items=60, synthetic_events=30, window=4, clusters=6,
                        follow_up=2, pretrain_steps=4, pretrain_window=8, encoder_dim=16, encoder_layers=1,
                        llm_hidden=32, llm_layers=1, tokenizer_vocab=400, llm_pretrain_steps=0, threads=1,
                        cache_dir=str(tmp_path))
    shared = prepare(cfg, tmp_path, log=lambda s: None)
    sd = seed_data(cfg, 0, shared, log=lambda s: None)
    for tr in (sd.train_tr, sd.heldout_tr, sd.test_tr):
        tr.positive = tr.cluster < sd.clusters.k // 2
    rows = {(r["task"], r["features"]): r for r in feature_probe(cfg, shared, sd, log=lambda s: None)["rows"]}
    assert rows["feedback", "cluster"]["auc"] > 0.95
    assert rows["feedback", "ratings"]["auc"] < 0.7          # the window's ratings say nothing of this rule
    assert rows["aligned", "cluster"]["group_auc"] > 0.6
