"""DistributedDataParallel on 2 CPU processes (gloo) launched with torch.distributed.run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import tiny_args

from userllm.runs import read_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_cpu_processes(tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tmp_path / "cache", out, steps=4, checkpoint_every=2, pretrain_steps=2, batch_size=8)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "userllm.train", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "metrics.json").read_text())
    assert results["train"]["world_size"] == 2
    # rank 0 alone writes: one log line per step, one table, one kernel message
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert proc.stdout.count("kernels:") == 1 and proc.stdout.count("popularity") == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002.safetensors",
                                                                       "step_00000004.safetensors"]
    assert (out / "pretrain" / "encoder.safetensors").is_file()
