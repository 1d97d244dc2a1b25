"""The pointer gate's post-hoc calibration: the fit against a brute-force optimum, and through
``python -m userllm.evaluate --calibrate-gate`` on a trained run (which it must not change)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from userllm.calibration import _nll, fit_gate
from userllm.cli import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(n=400, d=5, seed=0):
    """Target tokens where the pointer is right a third of the time: its log-prob is high there, the LLM's
    moderate everywhere."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    right = torch.rand(n, generator=g) < 1 / 3
    own = torch.log(torch.rand(n, generator=g, dtype=torch.float64) * 0.2 + 0.01)
    copy = torch.where(right, torch.log(torch.rand(n, generator=g, dtype=torch.float64) * 0.5 + 0.4),
                       torch.full((n,), -69.0, dtype=torch.float64))
    return hidden, own, copy


def test_the_bias_fit_is_the_one_dimensional_optimum():
    hidden, own, copy = _tokens()
    w0, b0 = torch.randn(5, generator=torch.Generator().manual_seed(1)), torch.tensor(4.0)   # g ~ 1: miscalibrated
    w, b, before, after = fit_gate(hidden, own, copy, w0, b0, fit="bias")
    assert torch.equal(w, w0.double())                                   # the weights stay
    grid = torch.linspace(-10, 10, 4001, dtype=torch.float64)
    losses = torch.stack([_nll(hidden.double(), own, copy, w0.double(), x) for x in grid])
    assert after <= before and after <= float(losses.min()) + 1e-9
    assert abs(float(b) - float(grid[losses.argmin()])) < 0.01
    assert before == pytest.approx(float(_nll(hidden.double(), own, copy, w0.double(), b0.double())))


def test_the_full_fit_is_at_least_as_good_and_rejects_unknown_fits():
    hidden, own, copy = _tokens(seed=3)
    w0, b0 = torch.zeros(5), torch.tensor(2.0)
    _, _, before, after_bias = fit_gate(hidden, own, copy, w0, b0, fit="bias")
    w, _, _, after_gate = fit_gate(hidden, own, copy, w0, b0, fit="gate")
    assert after_gate <= after_bias + 1e-9 < before and w.abs().sum() > 0
    with pytest.raises(ValueError, match="fit must be one of"):
        fit_gate(hidden, own, copy, w0, b0, fit="scale")


@pytest.fixture(scope="module")
def pointer_run(tmp_path_factory):
    from test_train import run_train, tiny_args

    root = tmp_path_factory.mktemp("pointer")
    run = root / "run"
    run_train(tiny_args(root / "cache", run, readout_tokens=3, readout_title_tokens=4, readout_pointer=True,
                        strategy="proj", steps=4, llm_pretrain_steps=20))
    return run


def test_evaluate_calibrates_on_the_validation_split_and_leaves_the_run_alone(pointer_run, tmp_path, capsys):
    from userllm.checkpoint import latest_checkpoint
    from userllm.evaluate import main as evaluate_main

    run = pointer_run
    ckpt = latest_checkpoint(run)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    evaluate_main([str(run), "--threads", "1", "--calibrate-gate", "bias", "--out", str(tmp_path / "cal.json")])
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "cal.json").read_text())
    cal = result["calibration"]
    assert cal["fit"] == "bias" and cal["tokens"] > 0 and cal["examples"] > 0
    assert cal["loss_after"] <= cal["loss_before"] and "calibrated the pointer's gate (bias)" in printed
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest        # the run's checkpoint is untouched
    assert run_cli(evaluate_main, [str(run), "--threads", "1", "--calibrate-gate", "bias", "--split", "val"]) == 2
    assert "--calibrate-gate: fits on the validation split" in capsys.readouterr().err


def test_the_benchmark_script_fits_both_ways_and_holds_out_half(pointer_run, capsys, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gate_calibration.py"
    monkeypatch.setattr(sys, "argv", ["gate_calibration.py", str(pointer_run)])
    runpy.run_path(str(script), run_name="__main__")
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"] > 0 and set(out) >= {"bias", "gate", "loss_as_trained"}
    for fit in ("bias", "gate"):
        assert out[fit]["loss"] <= out["loss_as_trained"] + 1e-9 and 0 < out[fit]["mean_gate"] < 1
        assert out[fit]["held_out_loss"] > 0
    assert out["gate"]["loss"] <= out["bias"]["loss"] + 1e-9


def test_calibrate_gate_needs_a_pointer_run(tmp_path, capsys):
    from test_train import run_train, tiny_args

    from userllm.evaluate import main as evaluate_main

    run = tmp_path / "run"
    run_train(tiny_args(tmp_path / "cache", run, steps=2, llm_pretrain_steps=20))
    assert run_cli(evaluate_main, [str(run), "--threads", "1", "--calibrate-gate", "bias"]) == 2
    assert "has no pointer head" in capsys.readouterr().err
