"""benchmarks/paper_table.py: the multi-seed runner of the paper's tables, on --tiny synthetic runs.

Checks that one command runs every (row, seed) and the shared encoder once per seed, that table.json's
mean and std are those of the per-seed metrics.json files, that table.md / table.png are written, that
a rerun reuses the finished runs, that another --steps into the same --out is refused, the subprocess
launcher, and the one-line errors.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from userllm.cli import run_cli

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("paper_table", REPO / "benchmarks" / "paper_table.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


pt = _load()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _argv(out, cache, *extra):
    return ["--tiny", "--in-process", "--out", str(out), "--cache-dir", str(cache), *extra]


def test_two_rows_two_seeds_aggregate_and_reuse(tmp_path, cache, capsys):
    out = tmp_path / "pt"
    assert run_cli(pt.main, _argv(out, cache, "--rows", "full,tp10", "--seeds", "2")) == 0
    printed = capsys.readouterr().out
    # the encoder of `full` ran once per seed; tp10 has none
    assert sorted(p.name for p in (out / "encoders").iterdir()) == ["ar-w20"]
    assert printed.count("encoder ar-w20") == 2
    for f in ("table.json", "table.md", "table.png"):
        assert (out / f).stat().st_size > 0
    table = json.loads((out / "table.json").read_text())
    assert list(table["rows"]) == ["full", "tp10"] and table["seeds"] == [0, 1]
    for row in ("full", "tp10"):
        per_seed = [json.loads((out / "rows" / row / f"seed_{s}" / "metrics.json").read_text()) for s in (0, 1)]
        for key, get in (("test.recall@10", lambda m: m["test"]["recall@10"]),
                         ("test.loss", lambda m: m["test"]["loss"]),
                         ("baselines.popularity.recall@10", lambda m: m["baselines"]["popularity"]["recall@10"])):
            vals = [get(m) for m in per_seed]
            agg = table["rows"][row]["metrics"][key]
            assert agg["values"] == vals and agg["n"] == 2
            assert agg["mean"] == pytest.approx((vals[0] + vals[1]) / 2)
            assert agg["std"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))   # ddof 1
        assert table["rows"][row]["seeds_done"] == 2
    assert "test.context_gain" in table["rows"]["full"]["metrics"]           # the User-LLM diagnostics
    md = (out / "table.md").read_text()
    assert "User-LLM xattn, Full (`full`)" in md and " ± " in md and "2/2" in md
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    assert len(stamps) == 6                                                   # 2 encoders + 4 rows

    assert run_cli(pt.main, _argv(out, cache, "--rows", "full,tp10", "--seeds", "2")) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing") == 6 and "running" not in printed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")} == stamps
    assert json.loads((out / "table.json").read_text())["rows"]["full"]["metrics"] == table["rows"]["full"]["metrics"]

    # --aggregate-only: a third seed is not run, the table says 2 of 3
    assert run_cli(pt.main, _argv(out, cache, "--rows", "full,tp10", "--seeds", "3", "--aggregate-only")) == 1
    assert "not run: full (2/3 seeds), tp10 (2/3 seeds)" in capsys.readouterr().err
    assert not (out / "rows" / "full" / "seed_2").exists()
    assert json.loads((out / "table.json").read_text())["rows"]["full"]["seeds_done"] == 2

    # the same --out with other options is refused, naming the run
    assert run_cli(pt.main, _argv(out, cache, "--rows", "full", "--seeds", "1", "--train-arg=--lr=0.01")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other options" in err and "full" in err


def test_subprocess_launcher_records_times(tmp_path, cache, capsys):
    out = tmp_path / "pt"
    argv = ["--tiny", "--out", str(out), "--cache-dir", str(cache), "--rows", "tp10", "--seeds", "1"]
    assert run_cli(pt.main, argv) == 0
    record = json.loads((out / "rows" / "tp10" / "seed_0.json").read_text())
    assert record["rc"] == 0 and record["cpu_s"] > 0 and record["wall_s"] >= record["cpu_s"] * 0.2
    assert "recall@10" in (out / "rows" / "tp10" / "seed_0.log").read_text()
    assert json.loads((out / "table.json").read_text())["rows"]["tp10"]["seeds_done"] == 1


def test_verdict_rule():
    f = pt.Finding("x", "a", ">", "b", "test.recall@10", "-")
    ms = pt.mean_std
    assert pt.verdict(f, ms([0.5, 0.6, 0.7]), ms([0.1, 0.1, 0.1]))["verdict"] == "reproduced"
    assert pt.verdict(f, ms([0.1, 0.1, 0.1]), ms([0.5, 0.6, 0.7]))["verdict"] == "not reproduced (reversed)"
    assert pt.verdict(f, ms([0.1, 0.3]), ms([0.2, 0.2]))["verdict"] == "not resolved (within noise)"
    # 2 hits against 1 in 200 users, in every seed: no spread over seeds, but the binomial floor says noise
    two, one = ms([0.01] * 3), ms([0.005] * 3)
    assert pt.verdict(f, two, one)["verdict"] == "reproduced"
    r = pt.verdict(f, two, one, 200, 200)
    assert r["verdict"] == "not resolved (within noise)"
    assert r["se"] == pytest.approx(math.sqrt(0.01 * 0.99 / 600 + 0.005 * 0.995 / 600))
    assert pt.verdict(pt.Finding("x", "a", ">=", "b", "m", "-"), ms([0.2, 0.21]), ms([0.2, 0.21]))["verdict"] \
        == "consistent (equal within noise)"
    same = pt.Finding("x", "a", "~", "b", "test.recall@1", "-")
    assert pt.verdict(same, ms([0.52, 0.52]), ms([0.54, 0.54]))["verdict"] == "reproduced"     # within 10%
    assert pt.verdict(same, ms([0.30, 0.30]), ms([0.54, 0.54]))["verdict"] == "not reproduced"
    assert pt.verdict(same, ms([0.01] * 3), ms([0.005] * 3), 200, 200)["verdict"].startswith("not resolved")
    assert pt.verdict(f, None, ms([0.1]))["verdict"] == "not run"
    # one seed: a recall keeps its binomial floor, a ROUGE has no noise estimate at all
    rouge = pt.Finding("x", "a", ">", "b", "test.rougeLsum", "-")
    assert pt.verdict(rouge, ms([0.3308]), ms([0.3328]))["verdict"].startswith("not resolved (one seed")
    assert pt.verdict(rouge, ms([0.33, 0.34]), ms([0.30, 0.30]))["verdict"] == "reproduced"
    assert pt.verdict(f, ms([0.05]), ms([0.005]), 200, 200)["verdict"] == "reproduced"
    assert ms([1.0])["std"] == 0.0 and ms([1.0, 3.0])["std"] == pytest.approx(math.sqrt(2))


@pytest.mark.parametrize("argv, message", [
    (["--rows", "full,nosuchrow"], "--rows: unknown row nosuchrow"),
    (["--seeds", "0"], "--seeds: must be >= 1, got 0"),
    (["--steps", "0"], "--steps: must be >= 1, got 0"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    assert run_cli(pt.main, ["--tiny", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}" or (err.startswith(f"error: {message}") and len(err.splitlines()) == 1)
    assert not (tmp_path / "o").exists()


def test_missing_data_dir_is_one_line(tmp_path, capsys):
    assert run_cli(pt.main, ["--data-dir", str(tmp_path / "none"), "--rows", "full", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data-dir" in err and "not found" in err


def _full_size_opts(tmp_path):
    """The runner's full-size options over empty stand-ins of every dataset directory: commands are built
    and parsed, nothing reads the data, so these tests run where ../shared/data is absent too."""
    data = tmp_path / "data"
    for args in pt.DATASETS.values():
        (data / args[list(args).index("--data-path") + 1]).mkdir(parents=True, exist_ok=True)
    return pt.parse(["--data-dir", str(data), "--out", str(tmp_path / "full-size")])


def test_the_pointer_row_runs_with_its_own_steps_users_encoder_and_decoder(tmp_path, cache, capsys):
    opts = _full_size_opts(tmp_path)
    argv = pt.stage2_argv(opts, pt.ROWS["pointer"], 0)
    for flag, value in (("--steps", "1500"), ("--eval-users", "0"), ("--caption-steps", "1500"),
                        ("--decoder", "exact"), ("--window", "50")):
        assert argv[argv.index(flag) + 1] == value
    assert "ar-w50-full" in argv[argv.index("--encoder-checkpoint") + 1] and "--readout-pointer" in argv
    stage1 = pt.stage1_argv(opts, pt.ENCODERS["ar-w50-full"], 0)
    assert stage1[stage1.index("--steps") + 1] == "0"                                    # its default length
    out = tmp_path / "pt"
    assert run_cli(pt.main, _argv(out, cache, "--rows", "pointer", "--seeds", "1")) == 0
    metrics = json.loads((out / "rows" / "pointer" / "seed_0" / "metrics.json").read_text())
    assert metrics["test"]["decoder"] == "exact" and metrics["model"].endswith("-pointer-caption6")


def test_every_full_size_command_parses(tmp_path):
    """Every encoder's and row's full-size command is one its entry point accepts (a mistyped flag or value in
    the ROWS / ENCODERS tables fails here, not an hour into a run)."""
    from userllm.config import PretrainConfig, TrainConfig, parse_config

    opts = _full_size_opts(tmp_path)
    for enc in pt.ENCODERS.values():
        cfg = parse_config(pt.stage1_argv(opts, enc, 0), cls=PretrainConfig)
        assert cfg.seed == 0 and cfg.encoder in ("ar", "dual")
    for row in pt.ROWS.values():
        if row.args is not None:
            assert parse_config(pt.stage2_argv(opts, row, 0), cls=TrainConfig).seed == 0
    dot = parse_config(pt.stage1_argv(opts, pt.ENCODERS["dual-w50-dot-table"], 0), cls=PretrainConfig)
    assert (dot.dual_score, dot.label_tower, dot.lr) == ("dot", "table", 3e-3)
    item = parse_config(pt.stage1_argv(opts, pt.ENCODERS["ar-w50-item"], 0), cls=PretrainConfig)
    assert item.rating_weight == 0 and item.category_weight == 0
