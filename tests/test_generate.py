"""python -m userllm.generate on tiny trained runs: dataset users and JSON histories, greedy / beam /
sampling / trie-constrained decoding, User-LLM and TextPrompt runs, and bad input as clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import run_train, tiny_args

from userllm.cli import run_cli
from userllm.generate import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    run_train(tiny_args(cache, out, steps=4, eval_users=1))
    return out


@pytest.fixture(scope="module")
def ds(run, cache):
    from userllm.config import parse_config
    from userllm.factory import load_data

    return load_data(parse_config(tiny_args(cache, run)))


def records(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_constrained_generation_returns_catalogue_items_for_dataset_users(run, ds, capsys):
    assert run_cli(main, [str(run), "--users", "3", "--user-ids", str(ds.events.user_ids[7]), "--constrained",
                          "--num-return", "3", "--split", "test"]) == 0
    recs = records(capsys)
    assert [r["user"] for r in recs] == [3, 7] and recs[1]["user_id"] == str(ds.events.user_ids[7])
    titles = set(ds.events.items.titles)
    for r in recs:
        assert len(r["generations"]) == 3 and set(r["generations"]) <= titles
        assert r["scores"] == sorted(r["scores"], reverse=True)
        assert r["reference"] in titles
        # the test window: the (up to) 6 events before the user's last one, as raw item ids
        u = r["user"]
        end = int(ds.offsets[u + 1]) - 1
        rows = range(max(int(ds.offsets[u]), end - 6), end)
        assert r["history"] == [str(ds.events.items.raw_ids[ds.item_index[ds.features["item"][i]]]) for i in rows]
    # the contrastive score (issue 14): still catalogue entries, best first, for the same users
    assert run_cli(main, [str(run), "--users", "3", "--constrained", "--num-return", "3", "--split", "test",
                          "--prior-weight", "0.5"]) == 0
    (rec,) = records(capsys)
    assert len(rec["generations"]) == 3 and set(rec["generations"]) <= titles
    assert rec["scores"] == sorted(rec["scores"], reverse=True)


def test_histories_file_greedy_beam_and_sampling(run, ds, tmp_path, capsys):
    raw = [str(x) for x in ds.events.items.raw_ids[:9]]
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"alice": raw[:3], "bob": [{"item": raw[4], "rating": 4}] + raw[5:9]}))
    out = tmp_path / "gen.jsonl"
    assert run_cli(main, [str(run), "--histories", str(path), "--max-new-tokens", "4", "--out", str(out)]) == 0
    greedy = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["name"] for r in greedy] == ["alice", "bob"]
    assert greedy[0]["history"] == raw[:3] and greedy[1]["history"] == [raw[4]] + raw[5:9]
    assert all(len(r["generations"]) == 1 and isinstance(r["generations"][0], str) for r in greedy)
    assert greedy[0]["prompt"].endswith("Answer:")

    capsys.readouterr()
    assert run_cli(main, [str(run), "--histories", str(path), "--num-beams", "3", "--num-return", "2",
                          "--max-new-tokens", "4", "--prompt", "Which movie next?"]) == 0
    beams = records(capsys)
    assert all(len(r["generations"]) == 2 and len(r["scores"]) == 2 for r in beams)
    assert beams[0]["prompt"] == "Which movie next?\nAnswer:"

    sampled = []
    for _ in range(2):
        assert run_cli(main, [str(run), "--histories", str(path), "--do-sample", "--seed", "5",
                              "--max-new-tokens", "4"]) == 0
        sampled.append([r["generations"] for r in records(capsys)])
    assert sampled[0] == sampled[1]  # the seed fixes the samples


def test_text_prompt_run_renders_the_history(cache, tmp_path, capsys):
    out = tmp_path / "tp"
    run_train(tiny_args(cache, out, steps=2, eval_users=1, baseline="textprompt"))
    capsys.readouterr()
    assert run_cli(main, [str(out), "--users", "0", "--constrained", "--num-return", "2"]) == 0
    (rec,) = records(capsys)
    assert rec["prompt"].startswith("History:\n1. ") and len(rec["generations"]) == 2
    assert rec["prompt"].count("\n") == len(rec["history"]) + 2
    # the contrastive score needs a User-LLM's user context: refused by the run config's rule, exit 2
    assert run_cli(main, [str(out), "--users", "0", "--constrained", "--prior-weight", "0.5"]) == 2
    assert "--prior-weight: only for the cross-attention User-LLM" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--users", "9999"], "--users 9999: no such user"),
    (["--user-ids", "nobody"], "--user-ids nobody: no user with this id"),
    (["--histories", "missing.json"], "no such file"),
    (["--histories", "bad-item.json"], "unknown item id 'no-such-item'"),
    ([], "choose users"),
    (["--users", "1", "--num-return", "2"], "--num-beams >= 2"),
    (["--users", "1", "--prior-weight", "0.5"], "only with --constrained"),
    (["--users", "1", "--constrained", "--prior-weight", "2"], "--prior-weight must be in [0, 1]"),
])
def test_bad_input_names_the_problem(run, tmp_path, capsys, argv, needle):
    (tmp_path / "bad-item.json").write_text(json.dumps([["no-such-item"]]))
    argv = [str(tmp_path / a) if a.endswith(".json") else a for a in argv]
    assert run_cli(main, [str(run), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err


def test_missing_run_dir_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "userllm.generate", str(tmp_path / "nope"), "--users", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no such run directory" in proc.stderr and "Traceback" not in proc.stderr
