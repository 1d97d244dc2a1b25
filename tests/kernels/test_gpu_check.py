"""benchmarks/gpu_check.sh in its CPU mode (``--tiny``), as CI runs it so that the GPU check cannot rot: every
stage runs (build configured, a test, kernel benchmarks with the embedding_bag and SDPA peers, end-to-end
and --compile benchmarks at toy size) and the output folder gets the logs, the benchmark JSON, check.json
and summary.md."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_mode_writes_every_output(tmp_path):
    out = tmp_path / "check"
    env = {k: v for k, v in os.environ.items() if k not in ("USERLLM_NATIVE_LIB",)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # python3 = this python
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--tiny"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((out / "check.json").read_text())
    assert report["mode"] == "tiny (CPU)" and report["commit"]
    assert [s["stage"] for s in report["stages"]] == ["build", "tests", "kernels", "e2e"]
    assert all(s["exit"] == "0" for s in report["stages"]), report["stages"]
    kernels = json.loads((out / "kernels.json").read_text())["benchmarks"]
    peers = {name for b in kernels for name in b["extra_info"].get("median_ms", {})}
    assert {"embedding_bag", "sdpa", "eager"} <= peers, peers
    e2e = {b["name"].split("[")[0] for b in json.loads((out / "e2e.json").read_text())["benchmarks"]}
    assert {"test_training_step_kernels", "test_compile_training_step"} <= e2e, e2e
    summary = (out / "summary.md").read_text()
    assert "| stage | exit | seconds |" in summary and "speedup vs peers" in summary
