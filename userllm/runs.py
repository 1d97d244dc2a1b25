"""Run directories, shared by both stages.

Layout: ``config.json`` (the resolved options), ``metrics.jsonl`` (one JSON object per logged step),
``metrics.json`` (final figures), ``checkpoints/step_XXXXXXXX.safetensors`` (resumable, see
:mod:`userllm.checkpoint`; with ``--distributed fsdp`` the resumable ones are ``step_XXXXXXXX.dcp/``
directories, :mod:`userllm.fsdp`), and what each stage adds (``llm/``, ``encoder.json``, ``pretrain/``,
``encoder.safetensors``, ``profile.json``, ``eval.json``). ``config.json`` and ``metrics.json`` are written
atomically; every JSON file is strict JSON (a NaN or infinite number is written as ``null``).

Rules (:func:`open_run`): a fresh run refuses a directory that already holds a run; ``--resume`` needs
one and continues from its newest checkpoint (or ``--checkpoint``), refusing options that would change
what was trained so far; a damaged newest checkpoint is reported with the newest good one.
:func:`cleanup_on_failure` removes a fresh run directory when the run fails before its first
checkpoint, so a failed start leaves nothing half-written; a resumed directory is never removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .checkpoint import CHECKPOINT_DIR, list_checkpoints, read_checkpoint
from .errors import UserError
from .utils.atomic import jsonable, write_json, write_text

CONFIG_FILE = "config.json"
METRICS_LOG = "metrics.jsonl"
METRICS_FILE = "metrics.json"
# What marks a directory as holding a run (a fresh run refuses it).
RUN_MARKERS = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_DIR, "encoder.safetensors")


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_json(value: Any) -> Any:
    """``value`` with tensors / NumPy scalars as Python numbers and non-finite floats as None (strict JSON)."""
    return jsonable(_plain(value))


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
        self._fh.write(json.dumps(to_json(record), sort_keys=True, allow_nan=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_run_config(run_dir: str | os.PathLike, config: dict) -> Path:
    """Write ``run_dir/config.json`` atomically (creating ``run_dir``)."""
    path = Path(run_dir) / CONFIG_FILE
    write_json(path, to_json(config))
    return path


def read_run_config(run_dir: str | os.PathLike) -> dict:
    return json.loads((Path(run_dir) / CONFIG_FILE).read_text())


def write_metrics(run_dir: str | os.PathLike, metrics: dict) -> Path:
    """Write the final figures to ``run_dir/metrics.json`` atomically."""
    path = Path(run_dir) / METRICS_FILE
    write_json(path, to_json(metrics))
    return path


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / m).exists() for m in RUN_MARKERS)


def _unreadable(read, path: Path) -> str | None:
    """None when ``read(path)`` accepts the checkpoint, else why not (its UserError's message)."""
    try:
        read(path)
    except UserError as exc:
        return str(exc)
    return None


def run_checkpoints(run_dir: Path, sharded: bool = False) -> list[tuple[int, Path]]:
    """(step, path) of the run's resumable checkpoints, oldest first: safetensors files, or with ``sharded``
    the FSDP checkpoint directories (:mod:`userllm.fsdp`)."""
    if not sharded:
        return list_checkpoints(run_dir)
    from .fsdp import list_sharded_checkpoints

    return list_sharded_checkpoints(run_dir)


def resume_checkpoint(run_dir: Path, explicit: str | os.PathLike | None = None, sharded: bool = False) -> Path | None:
    """The checkpoint a ``--resume`` continues from: ``explicit`` (``--checkpoint``), else the newest in
    ``run_dir`` (None when there is none yet). A damaged one is a UserError that names the newest good
    checkpoint and how to resume from it. ``sharded``: FSDP checkpoint directories instead of files."""
    if sharded:
        from .fsdp import read_sharded_meta as read
    else:
        read = read_checkpoint
    if explicit is not None:
        path = Path(explicit)
        if not path.exists() or path.is_dir() != sharded:
            kind = "sharded checkpoint directory (step_XXXXXXXX.dcp)" if sharded else "file"
            raise UserError(f"--checkpoint {path}: {kind} not found")
        why = _unreadable(read, path)
        if why is not None:
            raise UserError(f"--checkpoint: {why}")
        return path
    found = run_checkpoints(run_dir, sharded)
    if not found:
        return None
    step, newest = found[-1]
    why = _unreadable(read, newest)
    if why is None:
        return newest
    for s, p in reversed(found[:-1]):
        if _unreadable(read, p) is None:
            raise UserError(f"--resume: the newest checkpoint (step {step}) is damaged: {why}; the newest good "
                            f"one is {p} (step {s}): add --checkpoint {p} to resume from it")
    raise UserError(f"--resume: the newest checkpoint (step {step}) is damaged: {why}; no other checkpoint in "
                    f"{run_dir / CHECKPOINT_DIR} is readable")


def open_run(cfg, run_dir: Path, *, checkpoint: str | os.PathLike | None = None,
             sharded: bool = False) -> tuple[Path | None, bool]:
    """``(checkpoint to resume from or None, resuming?)`` for the options ``cfg`` (an
    :class:`~userllm.config.Options` with ``resume``), with the rules of the module docstring
    (``sharded``: the run writes FSDP checkpoint directories)."""
    if not cfg.resume:
        if holds_run(run_dir):
            raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        return None, False
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"--resume: {run_dir} has no config.json and no checkpoint (not a run directory)")
    diff = cfg.resume_differences(read_run_config(run_dir))
    if diff:
        raise UserError("--resume: options differ from the run being resumed: " + ", ".join(diff))
    return resume_checkpoint(run_dir, checkpoint, sharded), True


@contextlib.contextmanager
def cleanup_on_failure(run_dir: Path, *, resuming: bool, enabled: bool = True) -> Iterator[Path]:
    """Remove ``run_dir`` when the body fails, if this run created it and no checkpoint was written in it
    (a failed start leaves no half-written directory). A resumed or pre-existing directory is kept."""
    existed = run_dir.exists()
    try:
        yield run_dir
    except BaseException:
        if (enabled and not resuming and not existed and run_dir.exists() and not list_checkpoints(run_dir)
                and not run_checkpoints(run_dir, sharded=True)):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
