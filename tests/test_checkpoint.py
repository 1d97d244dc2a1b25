"""Checkpoints: exact resume (model + AdamW + cosine schedule + RNG), retention, bad files."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from userllm.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from userllm.encoders import EncoderConfig, build_encoder
from userllm.errors import UserError
from userllm.loop import cosine_with_warmup, seed_everything

SPECS = [dict(name="item", num_embeddings=25, multi_valued=False),
         dict(name="category", num_embeddings=6, multi_valued=True)]


pytestmark = pytest.mark.usefixtures("one_thread")


def fresh(seed: int):
    seed_everything(seed)
    # dropout > 0 so that the torch RNG stream matters for the losses
    model = build_encoder("ar", EncoderConfig(SPECS, d_model=16, n_layers=1, n_heads=2, dropout=0.2, max_len=8))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = cosine_with_warmup(opt, warmup_steps=2, total_steps=8, min_ratio=0.1)
    return model, opt, sched


def train_steps(model, opt, sched, n):
    losses = []
    for _ in range(n):
        # The batch comes from all three global generators, as a data loader with shuffling might.
        B = 3 + random.randrange(2)
        L = int(np.random.randint(3, 7))
        item = torch.randint(1, 25, (B, L))
        cat = torch.randint(-1, 6, (B, L, 2))
        loss, _ = model.next_event_loss([item, cat], torch.full((B,), L))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_resume_continues_exactly(tmp_path):
    model, opt, sched = fresh(0)
    straight = train_steps(model, opt, sched, 8)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched = fresh(0)
    first = train_steps(model, opt, sched, 4)
    save_checkpoint(tmp_path, 4, model, opt, sched, extra={"batch": 4})
    train_steps(model, opt, sched, 2)                                   # progress lost in the "kill"
    del model, opt, sched

    model, opt, sched = fresh(123)                                      # different init and RNG
    state = load_checkpoint(latest_checkpoint(tmp_path), model, opt, sched)
    assert state.step == 4 and state.extra == {"batch": 4}
    assert sched.last_epoch == 4 and opt.param_groups[0]["lr"] == pytest.approx(sched.get_last_lr()[0])
    resumed = first + train_steps(model, opt, sched, 4)
    assert resumed == straight
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k]), k


def test_multiple_models_and_rng_restore(tmp_path):
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(2, 1)
    seed_everything(5)
    path = save_checkpoint(tmp_path, 7, {"enc": a, "head": b})
    expect = (random.random(), float(np.random.rand()), torch.rand(2).tolist())
    a2, b2 = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    state = load_checkpoint(path, {"enc": a2, "head": b2})
    assert (random.random(), float(np.random.rand()), torch.rand(2).tolist()) == expect
    assert state.step == 7 and torch.equal(a2.weight, a.weight) and torch.equal(b2.bias, b.bias)
    with pytest.raises(UserError, match="no model 'other'"):
        load_checkpoint(path, {"other": a2})
    with pytest.raises(UserError, match="does not match"):
        load_checkpoint(path, {"enc": torch.nn.Linear(4, 2)})


def test_keep_last_and_latest(tmp_path):
    m = torch.nn.Linear(2, 2)
    assert latest_checkpoint(tmp_path) is None
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(tmp_path, step, m, keep_last=3)
    (tmp_path / "checkpoints" / ".step_00000060.safetensors.abc.tmp").write_bytes(b"half")  # a crashed write
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40, 50]
    assert latest_checkpoint(tmp_path).name == "step_00000050.safetensors"


def test_bad_checkpoint_files(tmp_path):
    m = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors", m)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="bad.safetensors"):
        load_checkpoint(bad, m)
