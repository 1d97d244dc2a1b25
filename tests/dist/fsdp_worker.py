"""One process of the FSDP2 test (tests/test_fsdp.py): ``torch.distributed.run --nproc-per-node N`` runs it.

    fsdp_worker.py OUT reference|fsdp

Trains a tiny UserLLM (2-layer Llama, cross-attention before both layers, gates open) for STEPS AdamW steps
on one fixed global batch of GLOBAL_BATCH rows, each with the same number of target tokens (so the mean
over processes equals the mean over the whole batch). ``reference``: one process, the whole batch.
``fsdp``: FSDP2 over the processes, rank r takes rows r::world; saves a sharded checkpoint after step
SAVE_AT, then builds a fresh model, resumes from it and repeats the remaining steps. Rank 0 writes
OUT/<mode>.json: {"losses": [...], "resumed": [...]} (the global mean loss of each step).
"""

import json
import os
import sys
from pathlib import Path

import torch

from userllm.integration import UserLLM, UserLLMConfig
from userllm.integration.testing import ToyEncoder, open_gates, tiny_llm, toy_features

STEPS, SAVE_AT, GLOBAL_BATCH, T = 4, 2, 8, 12


def build():
    torch.manual_seed(0)
    model = UserLLM(tiny_llm("llama", layers=2, seed=0), ToyEncoder([20, 5]), UserLLMConfig(xattn_every=1))
    open_gates(model, 0.5)
    model.train()
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (GLOBAL_BATCH, T), generator=g)
    feats, lengths = toy_features([5, 3, 7, 2, 6, 4, 7, 1], seed=2)
    return ids, feats, lengths


def step(model, opt, rows):
    ids, feats, lengths = batch()
    ids, feats, lengths = ids[rows], [f[rows] for f in feats], lengths[rows]
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), features=feats, lengths=lengths,
                 labels=ids).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def main(out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    if mode == "reference":
        model = build()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = [float(step(model, opt, slice(None))) for _ in range(STEPS)]
        (out / "reference.json").write_text(json.dumps({"losses": losses}))
        return

    import torch.distributed as dist

    from userllm.fsdp import list_sharded_checkpoints, load_sharded, save_sharded, shard_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = torch.arange(rank, GLOBAL_BATCH, world)

    def mean(loss):
        dist.all_reduce(loss)
        return float(loss) / world

    model = shard_model(build())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for s in range(1, STEPS + 1):
        losses.append(mean(step(model, opt, rows)))
        if s == SAVE_AT:
            save_sharded(out / "run", s, model, opt, extra={"note": "test"})
    (steps_saved,) = [s for s, _ in list_sharded_checkpoints(out / "run")]
    fresh = shard_model(build())
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    state = load_sharded(list_sharded_checkpoints(out / "run")[-1][1], fresh, fresh_opt)
    resumed = [mean(step(fresh, fresh_opt, rows)) for _ in range(state.step, STEPS)]
    if rank == 0:
        (out / "fsdp.json").write_text(json.dumps({"losses": losses, "resumed": resumed, "saved": steps_saved,
                                                   "extra": state.extra, "world": world}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
