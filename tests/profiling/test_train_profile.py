"""python -m userllm.train --profile: profile.json through userllm.profiling (per-component FLOPs measured
and analytic, step time, tokens/s, memory, NVML state), readable by python -m userllm.profiling.report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_train import run_train, tiny_args  # noqa: E402

from userllm.profiling.report import build_report  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prof")
    cache = root / "cache"
    common = dict(steps=4, eval_users=2, profile=True, log_every=2)
    run_train(tiny_args(cache, root / "ul", integration="softprompt", **common))
    run_train(tiny_args(cache, root / "tp", baseline="textprompt", **common))
    return root


def test_profile_sections(runs):
    prof = json.loads((runs / "ul" / "profile.json").read_text())
    assert prof["schema"] == "userllm.profile/1"
    run, step = prof["run"], prof["train_step"]
    assert run["method"] == "userllm" and run["history_length"] == 6 and run["batch_size"] == 8
    assert run["device"] == "cpu" and run["torch"]
    measured, analytic = step["flops"]["measured"], step["flops"]["analytic"]
    comps = measured["components"]
    assert {"llm", "encoder", "projection"} <= set(comps)
    assert all(c["forward"] > 0 and c["backward"] > 0 for k, c in comps.items() if k != "other")
    # strategy full trains every parameter: the analytic estimate is the measured count (same conventions)
    assert measured["total"] == pytest.approx(analytic["total"], rel=0.02)
    assert step["shape"]["n_events"] <= 6 and step["shape"]["batch"] == 8
    timing = step["timing"]
    assert timing["repeats"] == 3 and len(timing["wall_s_all"]) == 3 and timing["wall_s"] > 0
    assert step["tokens_per_s"] > 0 and timing["peak_rss_bytes"] > 0
    if not timing["gpu"]["available"]:
        assert timing["gpu"]["reason"].startswith("no NVIDIA GPU") and timing["energy_j"] is None
    # soft prompt: history events + task prompt positions are LLM context on top of the text
    tokens = prof["tokens"]
    assert tokens["prefix_mean"] > 4 and tokens["mean"] == pytest.approx(tokens["text_mean"] + tokens["prefix_mean"])
    assert prof["evaluation"]["users"] == 2


def test_report_pairs_user_llm_and_text_prompt_runs(runs, tmp_path):
    tp = json.loads((runs / "tp" / "profile.json").read_text())
    assert tp["run"]["method"] == "textprompt" and set(tp["train_step"]["flops"]["measured"]["components"]) <= {
        "llm", "other"}
    assert tp["tokens"]["prefix_mean"] == 0 and tp["tokens"]["mean"] > 20   # the history is in the prompt
    md = build_report([runs / "ul", runs / "tp"], tmp_path / "r")
    text = md.read_text()
    assert "| 6 | userllm |" in text and "| 6 | textprompt |" in text
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    (row,) = report["rows"]
    assert row["history_length"] == 6 and row["reduction_train_measured_total"] > 0
    assert row["token_ratio"] == pytest.approx(tp["tokens"]["mean"] /
                                               json.loads((runs / "ul" / "profile.json").read_text())["tokens"]["mean"])
    assert all((tmp_path / "r" / p).is_file() for p in report["plots"])
