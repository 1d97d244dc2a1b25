"""Summarize pytest-benchmark JSON files of this suite as the tables of benchmarks/RESULTS.md.

    python benchmarks/summarize.py kernels.json e2e.json

Kernel benchmarks (``test_kernels.py``) carry their own peer timings in ``extra_info`` (median ms of
every candidate, speedups of the fused op, GB/s, fraction of copy bandwidth, TFLOP/s). End-to-end
benchmarks (``test_end_to_end.py``) are single timings; this script pairs them into the ratios the issues
set targets for: User-LLM vs TextPrompt (prefill, decode per token, prefill + 16 tokens), fused vs
reference training step (tokens/s, peak memory), Perceiver vs none, cached vs recomputed user K/V.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def _median_ms(bench: dict) -> float:
    return bench["stats"]["median"] * 1e3


def kernel_table(benches: list[dict]) -> list[str]:
    rows = []
    for b in benches:
        e = b.get("extra_info", {})
        key = next((k for k in e if k.startswith("speedup_of_")), None)
        if key is None:
            continue
        fused = key[len("speedup_of_"):]
        frac = e.get("fraction_of_copy_bandwidth")
        peers = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in e[key].items())
        rows.append(f"| {b['name']} | {fused} | {e['median_ms'][fused]:.4f} | {e.get('GB/s', '')} | "
                    f"{'' if frac is None else f'{100 * frac:.0f}%'} | {e.get('TFLOP/s', '')} | {peers} |")
    if not rows:
        return []
    return ["| benchmark | fused op | median ms | GB/s | % copy bw | TFLOP/s | speedup vs peers |",
            "| --- | --- | --- | --- | --- | --- | --- |", *rows]


def _pairs(benches: list[dict], test: str, key: str, fast, slow) -> list[tuple[dict, dict, dict]]:
    """(extra_info of the group, fast bench, slow bench) for benchmarks of ``test`` that differ in ``key``."""
    groups: dict[tuple, dict] = defaultdict(dict)
    for b in benches:
        if b["name"].split("[")[0] != test:
            continue
        e = b.get("extra_info", {})
        rest = tuple(sorted((k, str(v)) for k, v in e.items() if k in ("history", "batch")))
        groups[rest][e.get(key)] = b
    return [(g[fast]["extra_info"], g[fast], g[slow]) for g in groups.values() if fast in g and slow in g]


def end_to_end_table(benches: list[dict]) -> list[str]:
    rows = []
    for test, label in (("test_prefill", "prefill + 1 token"), ("test_decode_per_token", "decode, per token"),
                        ("test_inference", "prefill + 16 tokens")):
        for e, fast, slow in sorted(_pairs(benches, test, "method", "userllm", "textprompt"),
                                    key=lambda p: p[0].get("history", 0)):
            rows.append(f"| User-LLM vs TextPrompt, {label} | history {e.get('history')}, batch {e.get('batch')} | "
                        f"{_median_ms(fast):.2f} | {_median_ms(slow):.2f} | {_median_ms(slow) / _median_ms(fast):.1f}x |")
    for e, fast, slow in _pairs(benches, "test_cross_attention_decode", "cached_user_kv", True, False):
        rows.append(f"| cached vs recomputed user K/V, decode step | history {e.get('history')}, batch {e.get('batch')} | "
                    f"{_median_ms(fast):.3f} | {_median_ms(slow):.3f} | {_median_ms(slow) / _median_ms(fast):.2f}x |")
    for e, fast, slow in _pairs(benches, "test_perceiver_inference", "perceiver_latents", 16, 0):
        rows.append(f"| Perceiver 16 latents vs none, inference | history {e.get('history')}, batch {e.get('batch')} | "
                    f"{_median_ms(fast):.2f} | {_median_ms(slow):.2f} | {_median_ms(slow) / _median_ms(fast):.2f}x |")
    for e, fast, slow in _pairs(benches, "test_training_step_kernels", "backend", "auto", "reference"):
        mem = ""
        if fast["extra_info"].get("peak_mem_bytes") and slow["extra_info"].get("peak_mem_bytes"):
            mem = (f"; peak memory {fast['extra_info']['peak_mem_bytes'] / 2**20:.0f} vs "
                   f"{slow['extra_info']['peak_mem_bytes'] / 2**20:.0f} MiB")
        rows.append(f"| training step, fused kernels vs reference | history {e.get('history')}, batch {e.get('batch')}"
                    f"{mem} | {_median_ms(fast):.2f} | {_median_ms(slow):.2f} | "
                    f"{_median_ms(slow) / _median_ms(fast):.2f}x |")
    if not rows:
        return []
    return ["| comparison | shape | ours ms | other ms | ratio |", "| --- | --- | --- | --- | --- |", *rows]


def environment_line(benches: list[dict]) -> str:
    for b in benches:
        e = b.get("extra_info", {})
        if "torch" in e:
            parts = [f"{k}={e[k]}" for k in ("device_name", "gpu", "torch", "triton", "commit", "llm_size",
                                              "llm_params") if e.get(k) is not None]
            return "environment: " + ", ".join(parts)
    return "environment: unknown"


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"{path}: no benchmark results ({exc})")
            continue
        benches = data.get("benchmarks", [])
        print(f"## {path} ({data.get('datetime', '?')}, commit {data.get('commit_info', {}).get('id', '?')[:10]})")
        print(environment_line(benches))
        for line in kernel_table(benches) + [""] + end_to_end_table(benches):
            print(line)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
