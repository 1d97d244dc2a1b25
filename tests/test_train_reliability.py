"""The training loop's guarantees: a non-finite loss stops the run (no non-finite checkpoint), every JSON
output is strict, ``--resume`` may raise ``--steps``, time counters add up over resumptions, a damaged
newest checkpoint names the good one (``--checkpoint``), and a failed start leaves no run directory."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from test_train import losses, run_train, tiny_args

from userllm.checkpoint import METADATA_KEY, list_checkpoints, read_checkpoint
from userllm.cli import run_cli
from userllm.runs import read_jsonl


def strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("stage", ["train", "pretrain"])
def test_a_diverging_run_stops_naming_the_step_and_keeps_only_finite_checkpoints(tmp_path, cache, capsys, stage):
    out = tmp_path / "run"
    if stage == "train":
        from userllm.train import main
        argv = tiny_args(cache, out, lr=1e9, steps=12, checkpoint_every=1)
    else:
        from userllm.pretrain import main
        argv = ["--out", str(out), "--cache-dir", str(cache), "--window", "8", "--d-model", "16", "--layers", "1",
                "--batch-size", "16", "--warmup", "0", "--lr", "1e9", "--steps", "12", "--checkpoint-every", "1",
                "--keep-checkpoints", "0", "--max-eval-users", "10"]
    assert run_cli(main, argv) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: step ") and err.count("\n") == 1
    assert any(w in err for w in ("loss is nan", "loss is inf", "weights became non-finite")), err
    step = int(err.split()[2].rstrip(":"))
    saved = list_checkpoints(out)
    assert not (out / "metrics.json").exists()
    if not saved:                                       # nothing good to keep: no half-written directory
        assert "no checkpoint had been written" in err and not out.exists()
        return
    assert saved[-1][0] == step - 1 and str(saved[-1][1]) in err
    for _, path in saved:                               # no checkpoint holds a non-finite weight
        tensors, _ = read_checkpoint(path)
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    for line in (out / "metrics.jsonl").read_text().splitlines():
        assert all(math.isfinite(v) for v in strict_json(line).values() if isinstance(v, float))


def test_json_outputs_are_strict(tmp_path, cache):
    from userllm.runs import MetricsLogger, write_metrics
    from userllm.utils.atomic import write_json

    write_metrics(tmp_path, {"loss": float("nan"), "r": [float("inf"), 1.0], "x": {"y": -float("inf")}})
    assert strict_json((tmp_path / "metrics.json").read_text()) == {"loss": None, "r": [None, 1.0], "x": {"y": None}}
    write_json(tmp_path / "p.json", {"energy_j": float("nan")})
    assert strict_json((tmp_path / "p.json").read_text()) == {"energy_j": None}
    with MetricsLogger(tmp_path / "m.jsonl") as log:
        log.log({"step": 1, "loss": torch.tensor(float("nan"))})
    assert strict_json((tmp_path / "m.jsonl").read_text()) == {"step": 1, "loss": None}
    out = tmp_path / "run"                               # a real run's files: all strict
    run_train(tiny_args(cache, out, steps=2, profile=True))
    for name in ("metrics.json", "config.json", "profile.json", "encoder.json"):
        strict_json((out / name).read_text())
    for line in (out / "metrics.jsonl").read_text().splitlines():
        strict_json(line)


def _killed_copy(src, dest, keep_step: int):
    """``dest``: ``src`` as if killed right after its ``keep_step`` checkpoint."""
    shutil.copytree(src, dest)
    for s, p in list_checkpoints(dest):
        if s > keep_step:
            p.unlink()
    (dest / "metrics.json").unlink()


def test_resume_may_raise_steps_on_the_final_schedule(tmp_path, cache):
    from userllm.loop import cosine_with_warmup

    a, b = tmp_path / "a", tmp_path / "b"
    common = dict(checkpoint_every=3, pretrain_steps=0, warmup=2)
    run_train(tiny_args(cache, a, steps=6, **common))
    _killed_copy(a, b, 3)
    results = run_train(tiny_args(cache, b, steps=9, resume=True, **common))
    log = read_jsonl(b / "metrics.jsonl")
    assert [r["step"] for r in log] == list(range(1, 10)) and results["train"]["steps"] == 9
    assert losses(b)[:4] == losses(a)[:4]                # steps 1-3 and the resumed step 4 (same lr at step 3)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    sched = cosine_with_warmup(opt, 2, 9, 0.1)
    expected = []
    for _ in range(9):
        opt.step()
        sched.step()
        expected.append(sched.get_last_lr()[0])
    assert [r["lr"] for r in log][3:] == pytest.approx(expected[3:], rel=1e-12)   # the 9-step schedule
    assert json.loads((b / "config.json").read_text())["steps"] == 9
    assert [s for s, _ in list_checkpoints(b)][-1] == 9


def test_time_counters_add_up_over_resumptions(tmp_path, cache):
    from userllm.utils.atomic import save_safetensors

    a, b = tmp_path / "a", tmp_path / "b"
    common = dict(steps=4, checkpoint_every=2, pretrain_steps=0)
    run_train(tiny_args(cache, a, **common))
    _killed_copy(a, b, 2)
    (path,) = [p for s, p in list_checkpoints(b) if s == 2]
    tensors, meta = read_checkpoint(path)
    meta["extra"].update(train_seconds=1000.0, total_seconds=2000.0)      # the killed run had trained 1000 s
    save_safetensors(path, tensors, {METADATA_KEY: json.dumps(meta)})
    results = run_train(tiny_args(cache, b, resume=True, **common))
    assert results["train"]["train_seconds"] >= 1000 and results["total_seconds"] >= 2000
    elapsed = [r["elapsed"] for r in read_jsonl(b / "metrics.jsonl")]
    assert elapsed[1] < 1000 <= elapsed[2] <= elapsed[3]


def test_a_damaged_newest_checkpoint_names_the_good_one(tmp_path, cache, capsys):
    from userllm.train import main

    a, b = tmp_path / "a", tmp_path / "b"
    common = dict(steps=6, checkpoint_every=2, pretrain_steps=0)
    run_train(tiny_args(cache, a, **common))
    _killed_copy(a, b, 4)
    newest = list_checkpoints(b)[-1][1]
    newest.write_bytes(newest.read_bytes()[:1000])                       # truncated by a crash
    good = list_checkpoints(b)[-2][1]
    assert run_cli(main, tiny_args(cache, b, resume=True, **common)) == 2
    err = capsys.readouterr().err
    assert "step 4" in err and "damaged" in err and f"--checkpoint {good}" in err
    run_train(tiny_args(cache, b, resume=True, checkpoint=good, **common))
    assert losses(b) == losses(a)


def test_a_failed_start_leaves_no_run_directory(tmp_path, cache, monkeypatch):
    from userllm import train as train_mod

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    out = tmp_path / "fresh"
    monkeypatch.setattr(train_mod, "build_model", broken)
    with pytest.raises(RuntimeError, match="boom"):
        run_train(tiny_args(cache, out, steps=2))
    assert not out.exists()
    monkeypatch.undo()
    # a run being resumed is never removed, even when its resumption fails
    run_train(tiny_args(cache, out, steps=2, checkpoint_every=1))
    (out / "metrics.json").unlink()
    monkeypatch.setattr(train_mod, "build_model", broken)
    with pytest.raises(RuntimeError):
        run_train(tiny_args(cache, out, steps=2, checkpoint_every=1, resume=True))
    assert (out / "config.json").is_file() and len(list_checkpoints(out)) == 2
