"""FSDP2 for stage 2 (``--distributed fsdp``): parameters, gradients and optimizer state sharded over the
processes, for LLMs whose full fine-tuning does not fit one device.

Sharding units (:func:`shard_model`): every decoder layer of the LLM and every gated cross-attention block
(``torch.distributed.fsdp.fully_shard`` each), then the root module with what is left (embeddings, the
LM head, the user encoder, projection, Perceiver, soft prompt). A unit's parameters are all-gathered
just before its forward and freed after it (``reshard_after_forward``), so a process holds one unit's
full parameters at a time plus its 1/world shard of everything. The cross-attention blocks' K/V
projection runs outside their ``forward`` (once per step, for every layer's block); it is registered as
an FSDP forward method so it all-gathers the block too.

Gradients are reduce-scattered as the *mean* over processes, so with equally many target tokens per
process the update equals one process's on the whole global batch (the test checks the losses within
fp32 tolerance).

Checkpoints (:func:`save_sharded` / :func:`load_sharded`): ``checkpoints/step_XXXXXXXX.dcp/``, a
``torch.distributed.checkpoint`` directory (every process writes its own shards of the model and
optimizer state) plus ``meta.json`` (step, LR scheduler, ``extra``) and ``rng_<rank>.safetensors`` (each
process's RNG state). It is written under a temporary name and renamed into place by rank 0 once every
process has finished (after a barrier): a crash leaves the previous checkpoints or the complete new
one. Resuming needs the same number of processes (the per-rank RNG states); DCP itself would reshard.

Evaluation after training (``python -m userllm.train --distributed fsdp``): :func:`meta_copy` keeps an
unsharded copy of the model's structure whose parameters live on the meta device (no memory) from before
sharding; :func:`unsharded` fills it on rank 0 with the full state dict (gathered to its CPU), so the
beam search, which calls the LLM and the encoder outside the root module's ``forward``, runs on one
unsharded model. Rank 0 then needs the parameters once (no gradients, no optimizer state: a quarter or
less of what full fine-tuning with AdamW holds).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CHECKPOINT_DIR, CheckpointState, capture_rng, list_checkpoints, restore_rng
from .errors import UserError
from .utils.atomic import save_safetensors, write_json

SHARDED_SUFFIX = ".dcp"
_NAME = re.compile(r"^step_(\d{8,})\.dcp$")


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`shard_model` shards on their own, in order: decoder layers, cross-attention blocks."""
    from .integration.layers import find_decoder_layers

    llm = getattr(model, "llm", model)
    _, layers = find_decoder_layers(llm)
    return list(layers) + list(getattr(model, "xattn", []))


def shard_model(model: nn.Module, mesh=None) -> nn.Module:
    """Apply FSDP2 in place (see the module docstring) on the default process group (or ``mesh``)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh)
    for block in getattr(model, "xattn", []):
        register_fsdp_forward_method(block, "project_kv")
    fully_shard(model, mesh=mesh)
    return model


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (call it before :func:`shard_model`) whose parameters are empty tensors on the
    meta device (buffers are copied: they are small, and non-persistent ones are in no state dict)."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def unsharded(model: nn.Module, shadow: nn.Module | None) -> nn.Module | None:
    """Rank 0: ``shadow`` (a :func:`meta_copy` of ``model`` before sharding) holding the trained parameters
    of the sharded ``model`` (on the CPU); other ranks: None. Collective."""
    import torch.distributed as dist

    state = full_state_dict(model)
    if dist.get_rank() != 0:
        return None
    shadow.load_state_dict(state, assign=True)
    return shadow


def weights_finite(model: nn.Module) -> bool:
    """Whether this process's shards of ``model``'s parameters and buffers are all finite (no collective)."""
    for t in [*model.parameters(), *model.buffers()]:
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return False
    return True


def read_sharded_meta(path: str | os.PathLike) -> dict:
    """``meta.json`` of a sharded checkpoint; UserError when ``path`` is not a complete one."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not path.is_dir() or not meta_path.is_file() or not (path / ".metadata").is_file():
        raise UserError(f"{path}: not a complete sharded userllm checkpoint (needs meta.json and .metadata)")
    try:
        return json.loads(meta_path.read_text())
    except ValueError as exc:
        raise UserError(f"{meta_path}: not readable ({exc})") from exc


def sharded_checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}{SHARDED_SUFFIX}"


def list_sharded_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete sharded checkpoint, oldest first (temporaries never match)."""
    return [(s, p) for s, p in list_checkpoints(run_dir, _NAME) if p.is_dir()]


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_sharded(run_dir: str | os.PathLike, step: int, model: nn.Module,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None,
                 extra: dict | None = None, keep_last: int = 3) -> Path:
    """Write the sharded training state at ``step`` (collective: every process calls it); returns the path."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    final = sharded_checkpoint_path(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)        # a killed writer's leftovers
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=str(tmp))
    rng_tensors, rng_meta = capture_rng()
    save_safetensors(tmp / f"rng_{rank}.safetensors", rng_tensors, {"rng": json.dumps(rng_meta)})
    dist.barrier()
    if rank == 0:
        write_json(tmp / "meta.json", {"step": int(step), "world_size": dist.get_world_size(), "extra": extra or {},
                                       "scheduler": scheduler.state_dict() if scheduler is not None else None})
        if final.exists():                            # re-saving a step (a resumed run): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last > 0:
            for _, old in list_sharded_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 scheduler: Any | None = None, restore_rng_state: bool = True) -> CheckpointState:
    """Restore a :func:`save_sharded` checkpoint in place (collective) and return its step and ``extra``."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    meta = read_sharded_meta(path)
    if meta["world_size"] != dist.get_world_size():
        raise UserError(f"{path} was written by {meta['world_size']} processes; resume it with as many "
                        f"(got {dist.get_world_size()})")
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if restore_rng_state:
        with safe_open(str(path / f"rng_{dist.get_rank()}.safetensors"), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            rng_meta = json.loads(fh.metadata()["rng"])
        restore_rng(tensors, rng_meta)
    return CheckpointState(step=int(meta["step"]), extra=meta.get("extra", {}), path=path)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded ``state_dict`` on the CPU of rank 0 (collective; other ranks get {}), e.g. to evaluate
    or export a model trained with FSDP in one process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
