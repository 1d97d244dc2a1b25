"""Resumable training checkpoints: one atomic safetensors file per step.

``<run_dir>/checkpoints/step_XXXXXXXX.safetensors`` holds every tensor of the training state:
  * ``model/<name>/<key>``        each module's ``state_dict``
  * ``optim/<param>/<key>``       the optimizer's per-parameter tensors (e.g. AdamW ``exp_avg``, ``step``)
  * ``rng/torch``, ``rng/cuda/<i>``, ``rng/numpy``  generator states as uint8 / uint32 tensors
and its metadata (string -> string) one JSON document under ``"userllm_checkpoint"`` with the rest:
step, the optimizer's non-tensor per-parameter state and ``param_groups``, the LR scheduler's
``state_dict``, Python's and NumPy's scalar RNG state, and ``extra`` (e.g. the data-loader position and
the run config). Restoring all of it continues a run exactly as if it had not stopped (on CPU; CUDA
kernels may be non-deterministic).

The file is written with :func:`userllm.utils.atomic.save_safetensors`, so a crash leaves either the
previous checkpoints or the complete new one; older ones beyond ``keep_last`` are deleted afterwards.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from userllm.errors import UserError
from userllm.utils.atomic import save_safetensors

METADATA_KEY = "userllm_checkpoint"
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8,})\.safetensors$")


@dataclass
class CheckpointState:
    """What :func:`load_checkpoint` returns besides restoring the objects: the step and ``extra``."""

    step: int
    extra: dict = field(default_factory=dict)
    path: Path | None = None


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.safetensors"


def list_checkpoints(run_dir: str | os.PathLike, pattern: re.Pattern = _NAME) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in ``run_dir``, oldest first (``pattern``: the file
    names, the step as its group 1; :mod:`userllm.fsdp` passes its sharded directories' pattern)."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = pattern.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """Path of the newest checkpoint in ``run_dir`` (highest step), or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _as_modules(models: torch.nn.Module | Mapping[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    if isinstance(models, torch.nn.Module):
        return {"model": models}
    return dict(models)


# ---- optimizer state: nested dict <-> flat tensors + JSON ------------------------------------------------
def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{pid}/{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, pid, key = name.split("/", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):  # JSON has no tuples; keep the optimizer's own type
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ---- RNG state ----------------------------------------------------------------------------------------------
def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    version, py_state, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(py_state), gauss]}
    return tensors, meta


def restore_rng(tensors: Mapping[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v for _, v in cuda][: torch.cuda.device_count()])
    kind, pos, has_gauss, cached = meta["numpy"]
    keys = tensors["rng/numpy"].numpy().view(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, cached))
    version, py_state, gauss = meta["python"]
    random.setstate((version, tuple(py_state), gauss))


# ---- save / load ----------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | os.PathLike, step: int,
                    models: torch.nn.Module | Mapping[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any | None = None,
                    extra: dict | None = None,
                    keep_last: int = 3) -> Path:
    """Write the full training state at ``step`` to ``run_dir/checkpoints/step_XXXXXXXX.safetensors``.

    models: one module (stored as "model") or ``{name: module}``; ``extra``: JSON-serializable dict
    (data position, config...). Keeps the newest ``keep_last`` checkpoints (0 or less keeps all).
    Returns the path written.
    """
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"step": int(step), "extra": extra or {}, "models": []}
    for name, module in _as_modules(models).items():
        if "/" in name:
            raise ValueError(f"model name {name!r} may not contain '/'")
        meta["models"].append(name)
        for key, value in module.state_dict().items():
            tensors[f"model/{name}/{key}"] = value
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = flatten_optimizer(optimizer)
        tensors.update(opt_tensors)
    if scheduler is not None:
        meta["scheduler"] = scheduler.state_dict()
    rng_tensors, meta["rng"] = capture_rng()
    tensors.update(rng_tensors)
    # safetensors refuses tensors that share storage; clone the (rare) aliases.
    seen: set[int] = set()
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr() if value.numel() else 0
        if ptr and ptr in seen:
            tensors[key] = value.clone()
        seen.add(ptr)
    path = checkpoint_path(run_dir, step)
    save_safetensors(path, tensors, {METADATA_KEY: json.dumps(meta)})
    if keep_last > 0:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a checkpoint file; UserError if it is missing or not a checkpoint."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # corrupt header / truncated file
        raise UserError(f"{path}: not a readable safetensors checkpoint ({exc})") from exc
    if METADATA_KEY not in meta:
        raise UserError(f"{path}: not a userllm checkpoint (no {METADATA_KEY!r} metadata)")
    return tensors, json.loads(meta[METADATA_KEY])


def load_checkpoint(path: str | os.PathLike,
                    models: torch.nn.Module | Mapping[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any | None = None,
                    restore_rng_state: bool = True) -> CheckpointState:
    """Restore the objects given from ``path`` (in place) and return its step and ``extra``.

    The models must have the architecture they were saved with (strict ``load_state_dict``).
    """
    tensors, meta = read_checkpoint(path)
    for name, module in _as_modules(models).items():
        if name not in meta["models"]:
            raise UserError(f"{path}: checkpoint has no model {name!r} (has {meta['models']})")
        prefix = f"model/{name}/"
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(sd)
        except RuntimeError as exc:
            raise UserError(f"{path}: model {name!r} does not match this configuration: {exc}") from exc
    if optimizer is not None:
        if "optimizer" not in meta:
            raise UserError(f"{path}: checkpoint has no optimizer state")
        optimizer.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict(meta["scheduler"])
    if restore_rng_state:
        restore_rng(tensors, meta["rng"])
    return CheckpointState(step=int(meta["step"]), extra=meta.get("extra", {}), path=Path(path))
