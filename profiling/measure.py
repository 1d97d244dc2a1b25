"""Measurement pieces shared by ``python -m userllm.profiling.compare`` and ``python -m userllm.train
--profile``: the environment record, timing a function under the NVML sampler, profiling a training
step (FLOPs per component, then time/memory/energy), and writing ``profile.json``.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from userllm.utils.atomic import write_json

from .flops import ComponentFlopCounter, FlopBreakdown, flops_summary, model_components
from .gpu import GpuSampler
from .timing import Timer, synchronize

SCHEMA = "userllm.profile/1"
PROFILE_FILE = "profile.json"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str) -> dict[str, Any]:
    """Device name, library versions and the git commit, for every profile and benchmark."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # triton is optional on CPU-only machines
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except Exception:
        commit = None
    return {"device": str(dev), "device_name": name, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "commit": commit, "cpu_threads": torch.get_num_threads()}


def measure(fn: Callable[[], Any], device: torch.device, repeats: int, interval_s: float) -> dict[str, Any]:
    """Run ``fn`` ``repeats`` times, each under its own Timer, all under one GPU sampler.

    Per-call figures are medians over the repeats (robust to a busy machine); ``wall_s_all`` keeps
    every call; energy is the sampled total divided by the number of calls.
    """
    results = []
    with GpuSampler(interval_s=interval_s) as sampler:
        for _ in range(max(repeats, 1)):
            with Timer(device) as t:
                fn()
            results.append(t.result)
    g = sampler.report()
    n = len(results)
    peak = [r.peak_mem_bytes for r in results if r.peak_mem_bytes is not None]
    rss = [r.peak_rss_bytes for r in results if r.peak_rss_bytes is not None]
    return {
        "repeats": n, "wall_s": statistics.median(r.wall_s for r in results),
        "wall_s_min": min(r.wall_s for r in results), "wall_s_all": [r.wall_s for r in results],
        "device_s": statistics.median(r.device_s for r in results),
        "cpu_s": statistics.median(r.cpu_s for r in results),
        "peak_mem_bytes": max(peak) if peak else None, "peak_rss_bytes": max(rss) if rss else None,
        "rss_peak_scope": results[0].rss_peak_scope,
        "gpu": g.to_dict(), "energy_j": None if g.energy_j is None else g.energy_j / n,
        "energy": "n/a (no NVIDIA GPU)" if not g.available else (
            "n/a (energy not supported by this GPU)" if g.energy_j is None else f"{g.energy_j / n:.3g} J"),
    }


def profile_training_step(step_fn: Callable[[], Any], model: nn.Module, *, device: torch.device | str = "cpu",
                          steps: int = 3, tokens_per_step: int | None = None,
                          analytic: FlopBreakdown | dict | None = None,
                          sampler_interval_s: float = 0.05) -> dict[str, Any]:
    """Profile a training step: FLOPs per component on one call, then time/memory/energy over ``steps``.

    step_fn: one full training step (forward, backward, optimizer step) on the next batch; it is called
        ``1 + steps`` times (these are real steps: the caller counts them as training steps).
    model: the UserLLM or the plain LLM being trained (its components are found by structure).
    tokens_per_step: LLM input tokens per step (for tokens/s); analytic: the analytic FLOPs to record.
    Returns the ``train_step`` section of ``profile.json``.
    """
    device = torch.device(device)
    comps, methods = model_components(model)
    synchronize(device)
    with ComponentFlopCounter(comps, methods=methods) as counter:
        step_fn()
    synchronize(device)
    out: dict[str, Any] = {"flops": {"measured": flops_summary(counter)}}
    if analytic is not None:
        out["flops"]["analytic"] = analytic.to_dict() if isinstance(analytic, FlopBreakdown) else dict(analytic)
    if steps > 0:
        timing = measure(step_fn, device, steps, sampler_interval_s)
        out["timing"] = timing
        if tokens_per_step:
            out["tokens_per_s"] = tokens_per_step / timing["wall_s"]
    out["tokens_per_step"] = tokens_per_step
    return out


def write_profile(run_dir: str | Path, **sections: Any) -> Path:
    """Merge ``sections`` (e.g. ``train_step=...``, ``inference=...``, ``run=...``) into ``run_dir/profile.json``.

    The file is written atomically; sections already there and not given are kept.
    """
    path = Path(run_dir) / PROFILE_FILE
    data: dict[str, Any] = {}
    if path.is_file():
        data = json.loads(path.read_text())
    data.update({k: v for k, v in sections.items() if v is not None})
    data["schema"] = SCHEMA
    write_json(path, data)
    return path
