"""Utilities shared by the training loops: seeding, LR schedule, device/dtype choice, progress bars,
JSON-lines metric logging and the run-directory layout.

Run directory (see CONTRACTS.md): ``config.json``, ``metrics.jsonl`` (one JSON object per logged step),
``metrics.json`` (final figures), ``checkpoints/step_XXXXXXXX.safetensors``. ``config.json`` and
``metrics.json`` are written atomically.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from userllm.utils.atomic import write_json, write_text


# ---- seeding -------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ---- learning-rate schedule ------------------------------------------------------------------------
def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                       min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the base LR over ``warmup_steps``, then cosine decay to
    ``min_ratio * base`` at ``total_steps`` (held there afterwards). Call ``scheduler.step()`` per step."""
    if warmup_steps < 0 or total_steps < 1 or not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"bad schedule: warmup={warmup_steps}, total={total_steps}, min_ratio={min_ratio}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- device and precision ----------------------------------------------------------------------------
def pick_device(device: str | None = "auto") -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA devices that support it; None (full fp32) elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The mixed-precision context for ``device`` (a no-op on CPU)."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---- progress -----------------------------------------------------------------------------------------
def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             initial: int = 0, disable: bool | None = None):
    """A tqdm bar on stderr; ``disable=None`` hides it when stderr is not a terminal (logs, tests)."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable, dynamic_ncols=True,
                leave=False)


# ---- metric logging -----------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class MetricsLogger:
    """Appends one JSON object per call to ``metrics.jsonl`` (flushed at once).

    ``resume_step``: when resuming from a checkpoint at that step, records logged after it by the
    interrupted run are dropped first (rewritten atomically), so the file reads like one clean run.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            write_text(self.path, "")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_text(self.path, "".join(line + "\n" for line in kept))
        self._fh = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        self._fh.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---- run directory ---------------------------------------------------------------------------------------
CONFIG_FILE = "config.json"
METRICS_LOG = "metrics.jsonl"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"


def write_run_config(run_dir: str | os.PathLike, config: dict) -> Path:
    """Write ``run_dir/config.json`` atomically (creating ``run_dir``)."""
    path = Path(run_dir) / CONFIG_FILE
    write_json(path, _jsonable(config))
    return path


def read_run_config(run_dir: str | os.PathLike) -> dict:
    return json.loads((Path(run_dir) / CONFIG_FILE).read_text())


def write_metrics(run_dir: str | os.PathLike, metrics: dict) -> Path:
    """Write the final figures to ``run_dir/metrics.json`` atomically."""
    path = Path(run_dir) / METRICS_FILE
    write_json(path, _jsonable(metrics))
    return path


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Temporarily put ``module`` in eval mode (restoring its previous mode)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler, params,
                   grad_clip: float = 0.0) -> None:
    """Backward ``loss``, clip the gradient norm of ``params`` to ``grad_clip`` (0 = no clipping), step the
    optimizer and the LR scheduler. Gradients are cleared first, so no stale gradient leaks in."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
