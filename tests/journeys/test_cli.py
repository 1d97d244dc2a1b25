"""``python -m userllm.journeys`` end to end on tiny synthetic data (every method, every output), and the
one-line errors: no encoder checkpoint, a bad option."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from userllm.cli import run_cli
from userllm.journeys.run import main

TINY = ["--synthetic-users", "30", "--synthetic-items", "60", "--synthetic-events", "30", "--pretrain-steps", "20",
        "--llm-hidden", "32", "--llm-layers", "1", "--tokenizer-vocab", "400", "--llm-pretrain-steps", "5",
        "--steps", "5", "--batch-size", "4", "--max-name-tokens", "4", "--plot-users", "2", "--window", "20"]


def test_whole_command_on_synthetic_data(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(main, TINY + ["--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    assert "coherence = mean intra-journey cosine" in printed
    for method in ("baseline", "fewshot", "prompt", "finetune"):
        assert f"\n{method} " in printed                          # a row of the names table
    records = [json.loads(line) for line in (out / "journeys.jsonl").read_text().splitlines()]
    assert len(records) == 30 and {r["split"] for r in records} == {"train", "test"}
    journeys = [j for r in records for j in r["journeys"]]
    assert journeys and all(j["size"] >= 5 and j["span_days"] >= 14 for j in journeys)
    assert all(len(j["items"]) == len(j["timestamps"]) == j["size"] for j in journeys)
    tested = [j for r in records if r["split"] == "test" for j in r["journeys"]]
    assert tested and all(set(j["names"]) == {"baseline", "fewshot", "prompt", "finetune"} for j in tested)
    assert all(j["reference"] and j["reference_source"] == "categories" for j in tested)
    assert all("supervision" in j for r in records if r["split"] == "train" for j in r["journeys"])
    for r in records:                                              # users without journeys carry the note
        assert bool(r["journeys"]) != (r.get("note") == "no persistent journey")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_journeys"] == len(tested) and metrics["names"]["baseline"]["count"] == len(tested)
    assert set(metrics["training"]) == {"fewshot", "prompt", "finetune"}
    # Prompt-tuning trains the soft prompt + projection only; fine-tuning (LoRA) adds adapters and the encoder.
    assert metrics["training"]["prompt"]["trainable"] < metrics["training"]["finetune"]["trainable"]
    assert metrics["quality"]["ratio"]["genre"] > 1.0
    pngs = sorted((out / "timelines").glob("user_*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


@pytest.mark.parametrize("args, message", [
    (["--encoder-checkpoint", "nowhere/encoder.safetensors"], "--encoder-checkpoint nowhere/encoder.safetensors: "
                                                              "no encoder checkpoint there"),
    (["--pretrain-steps", "0"], "no encoder checkpoint: give --encoder-checkpoint"),
    (["--genre-weight", "2"], "--genre-weight: must be <= 1.0"),
    (["--dataset", "movielens"], "--data-path: required for --dataset movielens"),
    (["--clusters", "3"], "unknown option '--clusters'"),
])
def test_one_line_errors(tmp_path, capsys, args, message):
    assert run_cli(main, args + ["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_error_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "userllm.journeys", "--pretrain-steps", "0", "--out",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: no encoder checkpoint") and proc.stderr.count("\n") == 1
