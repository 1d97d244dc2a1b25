"""benchmarks/summarize.py turns pytest-benchmark JSON into the RESULTS.md tables (ratios paired right)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def summarize():
    spec = importlib.util.spec_from_file_location("bench_summarize", ROOT / "benchmarks" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(name, median_s, **extra):
    return {"name": name, "stats": {"median": median_s}, "extra_info": extra}


def test_tables_pair_the_right_runs(summarize, tmp_path, capsys):
    benches = [
        _bench("test_inference[L2-userllm]", 0.010, method="userllm", history=200, batch=64, torch="2.11",
               commit="abc", llm_size="1024x8", llm_params=102_777_856),
        _bench("test_inference[L2-textprompt]", 0.250, method="textprompt", history=200, batch=64),
        _bench("test_inference[L0-textprompt]", 0.080, method="textprompt", history=50, batch=64),
        _bench("test_inference[L0-userllm]", 0.008, method="userllm", history=50, batch=64),
        _bench("test_cross_attention_decode[cached_kv]", 0.002, cached_user_kv=True, history=200, batch=64),
        _bench("test_cross_attention_decode[recomputed_kv]", 0.004, cached_user_kv=False, history=200, batch=64),
        _bench("test_training_step_kernels[auto]", 0.05, backend="auto", history=50, batch=64,
               peak_mem_bytes=100 * 2**20),
        _bench("test_training_step_kernels[reference]", 0.08, backend="reference", history=50, batch=64,
               peak_mem_bytes=120 * 2**20),
        _bench("test_cached_cross_attention_decode[200]", 0.001, median_ms={"eager": 0.5, "triton": 0.1},
               speedup_of_triton={"eager": 5.0}, **{"GB/s": 2500.0}, fraction_of_copy_bandwidth=0.8),
    ]
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"benchmarks": benches, "datetime": "2026-11-21", "commit_info": {"id": "abc"}}))
    assert summarize.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "llm_size=1024x8" in out
    assert "| User-LLM vs TextPrompt, prefill + 16 tokens | history 200, batch 64 | 10.00 | 250.00 | 25.0x |" in out
    assert "| User-LLM vs TextPrompt, prefill + 16 tokens | history 50, batch 64 | 8.00 | 80.00 | 10.0x |" in out
    assert "cached vs recomputed user K/V, decode step | history 200, batch 64 | 2.000 | 4.000 | 2.00x |" in out
    assert "peak memory 100 vs 120 MiB | 50.00 | 80.00 | 1.60x |" in out
    assert "| test_cached_cross_attention_decode[200] | triton | 0.1000 | 2500.0 | 80% |  | eager 5.00x |" in out


def test_missing_file_is_reported_not_raised(summarize, tmp_path, capsys):
    assert summarize.main([str(tmp_path / "none.json")]) == 0
    assert "no benchmark results" in capsys.readouterr().out
    assert summarize.main([]) == 2
