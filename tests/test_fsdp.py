"""FSDP2 (userllm.fsdp) on 2 CPU processes with gloo: same losses as one process on the same global batch,
sharded checkpoints that save atomically and resume exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist" / "fsdp_worker.py"


def run(args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume(tmp_path):
    run([str(WORKER), str(tmp_path), "reference"])
    run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER), str(tmp_path),
         "fsdp"])
    ref = json.loads((tmp_path / "reference.json").read_text())["losses"]
    got = json.loads((tmp_path / "fsdp.json").read_text())
    assert got["world"] == 2 and got["extra"] == {"note": "test"} and got["saved"] == 2
    assert ref[0] > ref[-1]                                               # it trains
    assert got["losses"] == pytest.approx(ref, rel=1e-5, abs=1e-6)        # fp32 tolerance
    assert got["resumed"] == got["losses"][2:]                            # exact resume
    ckpt = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.iterdir()] == ["step_00000002.dcp"]      # no temporaries left
    files = {p.name for p in (ckpt / "step_00000002.dcp").iterdir()}
    assert {"meta.json", "rng_0.safetensors", "rng_1.safetensors", ".metadata"} <= files


def _encoder_without_dropout(cache: Path, path: Path) -> Path:
    """An AR encoder for tiny_args' data with dropout 0: dropout draws differ between one process and two
    (each rank has its own RNG stream), so only a dropout-free model can give the same losses."""
    import torch

    from test_train import tiny_args

    from userllm.config import parse_config
    from userllm.encoders import build_encoder, save_encoder
    from userllm.factory import load_data

    cfg = parse_config(tiny_args(cache, path.parent / "unused"))
    torch.manual_seed(0)
    encoder = build_encoder("ar", {**cfg.encoder_spec(load_data(cfg)), "dropout": 0.0})
    save_encoder(encoder, path)
    return path


@pytest.mark.slow
def test_train_fsdp_matches_one_process_and_resumes(tmp_path):
    """``torchrun --nproc-per-node 2 -m userllm.train --distributed fsdp``: the losses of one process on the
    same global batch (fp32 tolerance), sharded checkpoints, and a killed run resumed with --resume
    continues with exactly the uninterrupted run's losses."""
    import shutil

    from test_train import tiny_args

    from userllm.runs import read_jsonl
    from userllm.train import main

    cache = tmp_path / "cache"
    enc = _encoder_without_dropout(cache, tmp_path / "encoder.safetensors")
    common = dict(steps=4, checkpoint_every=2, batch_size=8, encoder_checkpoint=enc)
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    assert main(tiny_args(cache, one, **common)) == 0
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "userllm.train"]
    run([*torchrun, *tiny_args(cache, two, distributed="fsdp", **common)])

    def losses(out):
        return [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]

    assert losses(one)[0] > losses(one)[-1]
    assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    assert json.loads((two / "metrics.json").read_text())["train"]["world_size"] == 2
    ckpt = two / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000002.dcp", "step_00000004.dcp",
                                                      "step_00000004.safetensors"]   # + the unsharded model
    assert {"meta.json", "rng_0.safetensors", "rng_1.safetensors"} <= {p.name for p in (ckpt / "step_00000002.dcp").iterdir()}

    # Killed after its step-2 checkpoint: resumed by two processes through the ordinary --resume.
    shutil.copytree(two, killed)
    shutil.rmtree(killed / "checkpoints" / "step_00000004.dcp")
    (killed / "checkpoints" / "step_00000004.safetensors").unlink()
    (killed / "metrics.json").unlink()
    run([*torchrun, *tiny_args(cache, killed, distributed="fsdp", resume=True, **common)])
    assert losses(killed) == losses(two)                                       # exactly, on CPU
    ra, rb = (json.loads((d / "metrics.json").read_text())["test"] for d in (two, killed))
    assert ra["recall@5"] == rb["recall@5"] and ra["loss"] == rb["loss"]


def test_fsdp_needs_several_processes(tmp_path, capsys):
    from test_train import tiny_args

    from userllm.cli import run_cli
    from userllm.train import main

    assert run_cli(main, tiny_args(tmp_path / "cache", tmp_path / "x", distributed="fsdp")) == 2
    assert "--distributed fsdp" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert run_cli(main, tiny_args(tmp_path / "cache", tmp_path / "y", distributed="fsdp", compile=True)) == 2
    assert "--compile is not supported" in capsys.readouterr().err
