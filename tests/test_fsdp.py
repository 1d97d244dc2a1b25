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
