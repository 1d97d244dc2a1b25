"""python -m userllm.explore end to end on tiny synthetic settings, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from userllm.cli import run_cli
from userllm.explore.__main__ import main
from userllm.explore.rescore import main as rescore_main

REPO = Path(__file__).resolve().parents[2]


def tiny_args(cache: Path, out: Path, **over) -> list[str]:
    opts = dict(synthetic_users=40, synthetic_items=40, synthetic_events=20, window=4, clusters=6,
                follow_up=2, pretrain_steps=4, pretrain_window=8, encoder_dim=16, encoder_layers=1, llm_hidden=32,
                llm_layers=1, tokenizer_vocab=400, llm_pretrain_steps=0, novelty_steps=4, aligned_steps=4,
                batch_size=8, n_values="1,2,4", eval_batch_size=8, seeds=2, threads=1, cache_dir=cache, out=out)
    opts.update(over)
    return [x for k, v in opts.items() for x in ("--" + k.replace("_", "-"), str(v))]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_run_writes_metrics_curve_and_valid_picks(tmp_path, cache):
    out = tmp_path / "run"
    assert run_cli(main, tiny_args(cache, out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    methods = {"random", "popular", "greedy", "aligned-all", "best-of-1", "best-of-2", "best-of-4"}
    assert set(metrics["mean"]) == methods
    assert metrics["seeds"] == [0, 1] and len(metrics["per_seed"]) == 2
    for m, r in metrics["mean"].items():
        assert 0.0 <= r["hit"]["mean"] <= 1.0 and len(r["hit"]["values"]) == 2
        assert r["distinct"]["mean"] >= 1
    # Cost grows with n; scoring everything new costs one pass per new cluster; baselines cost nothing.
    cost = {m: metrics["mean"][m]["passes"]["mean"] for m in methods}
    assert cost["best-of-1"] < cost["best-of-2"] < cost["best-of-4"] and cost["random"] == 0
    assert isinstance(metrics["target"]["met"], bool)
    # Every run says whether its aligned LLM learnt: held-out AUCs per seed and their mean.
    held = metrics["aligned_heldout"]
    assert len(held["auc"]["values"]) == 2 and all(0.0 <= v <= 1.0 for v in held["auc"]["values"])
    assert metrics["per_seed"][0]["aligned_training"]["heldout"]["pairs"] > 0
    assert "Aligned LLM on held-out users' pairs" in (out / "table.md").read_text()
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| best-of-4 |" in (out / "table.md").read_text()
    # The selector's concentration, read back from every seed's picks.
    conc = metrics["concentration"]
    assert 0.0 <= conc["cluster_bias_share"]["mean"] <= 1.0 and len(conc["cluster_bias_share"]["values"]) == 2
    assert conc["methods"]["aligned-all"]["aligned_top_share"]["mean"] == 1.0
    assert conc["methods"]["best-of-1"]["candidates"]["mean"] == 1.0
    assert "Selector concentration" in (out / "table.md").read_text()
    labels = json.loads((out / "seed_0" / "clusters.json").read_text())["labels"]
    rows = [json.loads(line) for line in (out / "seed_0" / "picks.jsonl").read_text().splitlines()]
    assert rows and len(rows) == metrics["per_seed"][0]["data"]["test_users"]
    for r in rows:
        assert r["target_label"] not in r["recent"]            # the target is novel for the user
        for m, c in r["picks"].items():                         # every method picks a cluster new for the user
            assert labels[c] not in r["recent"], (m, r)
        scores = {int(c): s for c, s in r["aligned_all"].items()}
        assert set(scores) == {c for c in range(len(labels)) if labels[c] not in r["recent"]}
        assert scores[r["picks"]["aligned-all"]] == max(scores.values())
        for n in (2, 4):                                        # best-of-n picks the top-scored sample
            best = max(scores[c] for c in r["samples"][str(n)])
            assert scores[r["picks"][f"best-of-{n}"]] >= best - 1e-3
        assert r["picks"]["best-of-1"] == r["samples"]["1"][0]
    # The same command again reuses the finished seeds (nothing is retrained); other options are refused.
    assert run_cli(main, tiny_args(cache, out)) == 0
    assert json.loads((out / "metrics.json").read_text())["mean"] == metrics["mean"]
    assert run_cli(main, tiny_args(cache, out, clusters=5)) == 2
    # Re-scoring the saved picks with the run's own rule reproduces every best-of-n and baseline figure.
    assert run_cli(rescore_main, ["--run", str(out), "--selections", "top,softmax"]) == 0
    doc = json.loads((out / "rescore.json").read_text())
    assert set(doc["rules"]) == {"top", "softmax"} and doc["seeds"] == [0, 1]
    for m, r in metrics["mean"].items():
        for k in ("hit", "pos_among_hits", "item_recall@10", "distinct", "entropy"):
            assert doc["rules"]["top"]["mean"][m][k]["values"] == pytest.approx(r[k]["values"]), (m, k)
    assert "--selection softmax (T = 1)" in (out / "rescore.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--run", "/nonexistent/run"], "--run /nonexistent/run: not a directory"),
    (["--selections", "top"], "--run: required"),
    (["--run", ".", "--selections", "top,best"], "--selections"),
])
def test_rescore_bad_input_is_one_line(tmp_path, capsys, args, message):
    assert run_cli(rescore_main, args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_the_encoder_cache_key_follows_the_recipe_the_data_and_the_held_out_users(tmp_path):
    import dataclasses

    from userllm.explore.config import ExploreConfig
    from userllm.explore.run import encoder_cache_path, encoder_signature
    from userllm.factory import load_data

    cfg = ExploreConfig(synthetic_users=40, synthetic_items=40, synthetic_events=20, cache_dir=str(tmp_path))
    ds = load_data(cfg.train_config(0))
    pcfg = cfg.train_config(0).pretrain_config(None)
    held = np.zeros(ds.num_users, dtype=bool)
    held[:5] = True
    key = lambda p, h: encoder_cache_path(tmp_path, encoder_signature(p, ds, h))   # noqa: E731
    assert key(pcfg, held) == key(dataclasses.replace(pcfg, threads=2, out="elsewhere"), held.copy())
    other_users = held.copy()
    other_users[5] = True
    assert len({key(pcfg, held), key(pcfg, other_users), key(dataclasses.replace(pcfg, steps=7), held),
                key(dataclasses.replace(pcfg, window=12), held), key(dataclasses.replace(pcfg, seed=1), held)}) == 5


def test_a_rerun_reuses_the_cached_encoder_pretraining(tmp_path, capsys):
    """The encoder pretrained on the training users is cached beside the data, keyed by what it depends on:
    a second run (another --out, another option) loads it and gets the same clusters. That second run selects
    by --selection lift (score minus the per-cluster prior) among the same samples, and the offline
    re-scoring of the first (top-rule) run with lift gives the same figures."""
    cache, runs = tmp_path / "cache", {rule: tmp_path / rule for rule in ("top", "lift")}
    assert run_cli(main, tiny_args(cache, runs["top"], seeds=1)) == 0
    first = json.loads((runs["top"] / "metrics.json").read_text())["encoder"]
    assert first["cached"] is False and Path(first["cache"]).is_file()
    capsys.readouterr()
    assert run_cli(main, tiny_args(cache, runs["lift"], seeds=1, selection="lift")) == 0
    lift = json.loads((runs["lift"] / "metrics.json").read_text())
    assert lift["encoder"] == {"cache": first["cache"], "cached": True}
    assert "encoder: pretrained weights from" in capsys.readouterr().out
    clusters = [json.loads((runs[r] / "seed_0" / "clusters.json").read_text()) for r in runs]
    assert clusters[0] == clusters[1]                       # the same item embeddings
    assert run_cli(rescore_main, ["--run", str(runs["top"]), "--selections", "lift"]) == 0
    rescored = json.loads((runs["top"] / "rescore.json").read_text())["rules"]["lift"]
    for m, r in lift["mean"].items():
        for k in ("hit", "pos_among_hits", "item_recall@10", "distinct", "entropy"):
            assert rescored["mean"][m][k]["values"] == pytest.approx(r[k]["values"]), (m, k)
    assert set(rescored["gain_over_n1"]) == {"best-of-2", "best-of-4"}
    rows = [json.loads(line) for line in (runs["lift"] / "seed_0" / "picks.jsonl").read_text().splitlines()]
    assert all(r["picks"][f"best-of-{n}"] in r["samples"][str(n)] for r in rows for n in (1, 2, 4))
    # A damaged entry is not trusted (no signature: it is pretrained again and overwritten).
    from userllm.explore.run import _cached_signature

    assert _cached_signature(Path(first["cache"])) is not None
    Path(first["cache"]).write_bytes(b"not safetensors")
    assert _cached_signature(Path(first["cache"])) is None


@pytest.mark.parametrize("over, message", [
    ({"clusters": 1}, "--clusters: must be >= 2"),
    ({"clusters": 500}, "--clusters 500"),
    ({"n_values": "1,x"}, "--n-values"),
    ({"window": 9}, "--pretrain-window"),
    ({"dataset": "movielens"}, "--data-path"),
    ({"feedback": "maybe"}, "--feedback"),
])
def test_bad_options_are_one_line_errors(tmp_path, cache, capsys, over, message):
    assert run_cli(main, tiny_args(cache, tmp_path / "o", seeds=1, **over)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_module_entry_point_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "userllm.explore", "--top-p", "2"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --top-p: must be <= 1.0, got 2.0"


def test_runs_with_a_local_hf_llm_directory(tmp_path, cache):
    """``--llm DIR``: any local Hugging Face causal LM (here a tiny Llama saved with its tokenizer)."""
    from userllm.llm import DefaultLLMConfig, load_llm

    model, tok = load_llm(None, texts=["Recent interests: Drama & Comedy.", "Answer: yes", "Answer: no"] * 20,
                          default_config=DefaultLLMConfig.sized(32, 1, 300), log=None)
    llm_dir = tmp_path / "hf"
    model.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    out = tmp_path / "run"
    assert run_cli(main, tiny_args(cache, out, seeds=1, llm=llm_dir)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "config.json").read_text())["llm"] == str(llm_dir)
    assert metrics["mean"]["best-of-4"]["tokens"]["mean"] > metrics["mean"]["best-of-1"]["tokens"]["mean"]


def test_a_run_made_before_aligned_head_existed_reads_back_as_the_answer_head(tmp_path, cache, capsys):
    """The default head changed (answer -> user): an old run directory, whose config has no aligned_head,
    must not be taken for a run of the new default (its finished seeds were trained with the answer head)."""
    from userllm.config import parse_config
    from userllm.explore.config import ExploreConfig

    out = tmp_path / "old"
    out.mkdir()
    args = tiny_args(cache, out)
    old = parse_config(args, cls=ExploreConfig).to_dict() | {"out": str(out)}
    del old["aligned_head"]
    (out / "config.json").write_text(json.dumps(old))
    assert run_cli(main, args) != 0
    assert "already holds a run with other options" in capsys.readouterr().err
