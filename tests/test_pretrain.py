"""End-to-end pretraining on the synthetic data through ``main([...])``: run layout, exact resume through
the CLI, the dual encoder, and bad options."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from userllm.cli import run_cli
from userllm.encoders import load_encoder
from userllm.errors import UserError
from userllm.pretrain import PretrainConfig, main
from userllm.runs import read_jsonl


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def tiny(out, cache, *extra):
    return ["--out", str(out), "--cache-dir", cache, "--window", "8", "--d-model", "16", "--layers", "1",
            "--batch-size", "16", "--warmup", "2", "--log-every", "1", "--max-eval-users", "60", *extra]


def test_end_to_end_writes_run_layout(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert main(tiny(out, cache, "--steps", "6", "--checkpoint-every", "3", "--eval-every", "3")) == 0
    printed = capsys.readouterr().out
    assert "popularity" in printed and "recall@10" in printed
    counts = re.search(r"(\d+) training windows of up to 8 events at stride 8 "
                       r"\(--stride 1, the paper's setting, would give (\d+)\)", printed)
    assert counts and int(counts[2]) > int(counts[1]) > 0
    assert json.loads((out / "config.json").read_text())["steps"] == 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003.safetensors",
                                                                       "step_00000006.safetensors"]
    log = read_jsonl(out / "metrics.jsonl")
    train = [r for r in log if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss/item"] > 0 and r["loss/rating"] > 0 and r["loss/category"] > 0 for r in train)
    assert [r["split"] for r in log if "split" in r] == ["val", "test"]
    metrics = json.loads((out / "metrics.json").read_text())
    for model in ("encoder", "popularity"):
        m = metrics["test"][model]
        assert set(m) >= {"recall@1", "recall@5", "recall@10", "ndcg@10"} and m["count"] == 60
        assert 0 <= m["recall@1"] <= m["recall@5"] <= m["recall@10"] <= 1
    assert set(metrics["val"]) == {"encoder", "popularity"}
    enc = load_encoder(out / "encoder.safetensors")
    assert enc.output_dim == 16 and [f.name for f in enc.features] == ["item", "rating", "category"]


def test_resume_through_cli_matches_straight_run(tmp_path, cache):
    args = ("--steps", "6", "--checkpoint-every", "3", "--dropout", "0.3")
    straight, broken = tmp_path / "a", tmp_path / "b"
    assert main(tiny(straight, cache, *args)) == 0
    assert main(tiny(broken, cache, *args)) == 0
    # "Kill" run b after step 3: drop everything it wrote later, then resume.
    (broken / "checkpoints" / "step_00000006.safetensors").unlink()
    (broken / "encoder.safetensors").unlink()
    (broken / "metrics.json").unlink()
    with open(broken / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 5, "loss": -1.0}) + "\n")       # a record the crash left behind
    assert main(tiny(broken, cache, *args, "--resume")) == 0
    losses = lambda run: [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert losses(broken) == losses(straight)
    a, b = load_file(straight / "encoder.safetensors"), load_file(broken / "encoder.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_guards(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert run_cli(main, tiny(out, cache, "--steps", "2", "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(tiny(out, cache, "--steps", "2")) == 0
    assert run_cli(main, tiny(out, cache, "--steps", "2")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert run_cli(main, tiny(out, cache, "--steps", "4", "--lr", "0.01", "--resume")) == 2
    assert "lr" in capsys.readouterr().err


def test_dual_encoder_pretrain(tmp_path, cache):
    out = tmp_path / "dual"
    assert main(tiny(out, cache, "--encoder", "dual", "--steps", "3", "--user-embeddings", "2",
                     "--negatives", "sampled", "--num-negatives", "32", "--filter-seen")) == 0
    enc = load_encoder(out / "encoder.safetensors")
    assert enc.kind == "dual" and enc.config.num_user_embeddings == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["filter_seen"] is True and metrics["test"]["encoder"]["count"] == 60


def test_train_fraction_trains_on_a_seeded_sample_of_the_windows(tmp_path, cache, capsys):
    """--train-fraction: fewer windows (and steps, at the same epochs), the same test users."""
    full, half = tmp_path / "full", tmp_path / "half"
    assert main(tiny(full, cache, "--epochs", "1")) == 0
    n_full = int(re.search(r"(\d+) training windows", capsys.readouterr().out)[1])
    assert main(tiny(half, cache, "--epochs", "1", "--train-fraction", "0.5")) == 0
    printed = capsys.readouterr().out
    n_half = int(re.search(r"(\d+) training windows", printed)[1])
    assert n_half == round(0.5 * n_full) and f"a 0.5 sample of {n_full}" in printed
    steps = lambda run: json.loads((run / "metrics.json").read_text())["steps"]  # noqa: E731
    counts = lambda run: json.loads((run / "metrics.json").read_text())["test"]["encoder"]["count"]  # noqa: E731
    assert steps(half) < steps(full) and counts(half) == counts(full) == 60


def test_dual_logq_correction_is_on_by_default_and_fed_the_train_item_counts(cache):
    from userllm import pretrain

    assert pretrain.parse_config(["--encoder", "dual"]).logq_correction is True
    cfg = pretrain.parse_config(["--encoder", "dual", "--no-logq-correction", "--steps", "1", "--window", "8",
                                 "--d-model", "16", "--layers", "1", "--cache-dir", cache])
    assert cfg.logq_correction is False
    cfg.logq_correction = True
    ds = pretrain.load_data(cfg)
    enc, _ = pretrain.pretrain_encoder(ds, cfg, torch.device("cpu"))
    assert enc.config.logq_correction
    counts = pretrain.train_item_counts(ds)
    expected = ((counts.double() + 1) / (counts.double() + 1).sum()).log().float()
    assert torch.allclose(enc.label_log_q, expected)


@pytest.mark.parametrize("argv,needle", [
    (["--encoder", "rnn"], "--encoder: 'rnn' is not one of ar, dual"),
    (["--steps", "-1"], "--steps: must be >= 0"),
    (["--epochs", "-1"], "--epochs: must be >= 0"),
    (["--dataset", "movielens"], "--data-path: required"),
    (["--d-model", "30", "--heads", "4"], "divisible"),
    (["--bogus"], "unknown option '--bogus'"),
    (["--lr", "fast"], "--lr: expected a number"),
    (["--train-fraction", "0"], "--train-fraction: must lie in (0, 1]"),
    (["--train-fraction", "1.5"], "--train-fraction"),
])
def test_bad_options_exit_2_without_traceback(argv, needle, capsys, tmp_path):
    assert run_cli(main, argv + ["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_missing_data_path_is_a_user_error(tmp_path, capsys):
    rc = run_cli(main, ["--dataset", "movielens", "--data-path", str(tmp_path / "nope"), "--out", str(tmp_path / "r"),
                        "--cache-dir", str(tmp_path / "c")])
    assert rc == 2 and "nope" in capsys.readouterr().err


def test_config_defaults_are_valid():
    cfg = PretrainConfig()
    cfg.validate()
    with pytest.raises(UserError, match="--fusion: 'mean' is not one of"):
        PretrainConfig(fusion="mean").validate()
    assert cfg.window == 50 and cfg.effective_stride == 50
    assert PretrainConfig(encoder="dual").effective_stride == 1
    assert PretrainConfig(encoder="dual", dual_targets="all").effective_stride == 50
    assert PretrainConfig(encoder="dual", dual_targets="all").total_steps(130) == 40 * 3
    with pytest.raises(UserError, match="--dual-targets all: needs --fusion last"):
        PretrainConfig(encoder="dual", dual_targets="all", user_embeddings=2).validate()
    assert cfg.total_steps(130) == 40 * 3 and PretrainConfig(steps=7).total_steps(130) == 7
    assert PretrainConfig(encoder="dual").total_steps(130) == 2 * 3
    assert PretrainConfig(epochs=1.5).total_steps(130) == 5
    with pytest.raises(UserError, match="--epochs"):
        PretrainConfig(epochs=float("nan")).validate()


def test_early_stopping_keeps_the_best_validation(tmp_path, cache):
    from userllm.pretrain import EarlyStopping

    model = torch.nn.Linear(2, 1)
    stop = EarlyStopping(patience=2)
    assert not stop.update(10, 0.2, model)
    best = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not stop.update(20, 0.2, model)                       # equal is not better
    assert stop.update(30, 0.1, model) and stop.step == 10 and stop.score == 0.2
    assert torch.equal(stop.state["weight"], best)
    out = tmp_path / "es"
    assert main(tiny(out, cache, "--encoder", "sasrec", "--steps", "40", "--eval-every", "2", "--patience", "1",
                     "--lr", "1e-5", "--checkpoint-every", "100")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 40 and m["steps_run"] < 40 and m["best_val_step"] <= m["steps_run"]
    assert (out / "checkpoints" / f"step_{m['steps_run']:08d}.safetensors").is_file()


def test_patience_needs_validation_and_a_fresh_run():
    with pytest.raises(UserError, match="--patience: needs --eval-every"):
        PretrainConfig(patience=2).validate()
    with pytest.raises(UserError, match="--patience: not with --resume"):
        PretrainConfig(patience=2, eval_every=5, resume=True).validate()
