"""UserLLM end to end: each integration x Perceiver on several LLM families trains; API contracts."""

from __future__ import annotations

import copy

import pytest
import torch

from userllm.integration import UserLLM, UserLLMConfig
from userllm.integration.testing import ToyEncoder, open_gates, single_thread, tiny_llm, toy_features
from userllm.utils.hf import enable_activation_checkpointing

CASES = [(fam, integ, lat) for fam in ("llama", "gpt2", "gpt_neox") for integ in ("xattn", "softprompt")
         for lat in (0, 3)] + [(fam, "xattn", 0) for fam in ("qwen2", "mistral", "gemma")]


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def train_steps(model, steps=6, lr=3e-3):
    feats, lens = toy_features([6, 3, 0, 5], seed=2)
    ids = torch.randint(3, 96, (4, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids, mask, features=feats, lengths=lens, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family,integration,latents", CASES)
def test_a_few_steps_lower_the_loss(family, integration, latents):
    torch.manual_seed(0)
    cfg = UserLLMConfig(integration=integration, perceiver_latents=latents, task_prompt_len=2, dropout=0.1)
    model = UserLLM(tiny_llm(family), ToyEncoder([20, 5]), cfg)
    losses = train_steps(model)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses
    # the user side is actually trained: its weights moved
    assert model.encoder.out.weight.grad is not None and model.encoder.out.weight.grad.abs().sum() > 0
    if integration == "xattn":
        assert all(block.attn_gate.item() != 0 for block in model.xattn)


def test_user_side_only_training_learns_from_the_history():
    """proj-like setup (LLM frozen): the only way to lower the loss is through the user tokens."""
    torch.manual_seed(0)
    model = UserLLM(tiny_llm("llama"), ToyEncoder([20, 5]), UserLLMConfig(integration="xattn"))
    for p in model.llm.parameters():
        p.requires_grad_(False)
    losses = train_steps(model, steps=8, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.grad is None for p in model.llm.parameters())


def test_encode_users_and_context_contract():
    model = UserLLM(tiny_llm("gpt2"), ToyEncoder([20, 5]), UserLLMConfig(xattn_every=2, xattn_kv_heads=2))
    feats, lens = toy_features([3, 0])
    states, kv_lengths = model.encode_users(feats, lens)
    assert states.shape == (2, 3, 32) and kv_lengths.tolist() == [3, 0] and kv_lengths.dtype == torch.int64
    ctx = model.prepare_user_context(feats, lens)
    assert ctx.cached and len(ctx.keys) == len(model.xattn) == 1
    assert ctx.keys[0].shape == (2, 3, 2, model.xattn[0].head_dim)
    ids = torch.randint(3, 96, (2, 4))
    with torch.no_grad():
        a = model(ids, user_context=ctx).logits
        b = model(ids, features=feats, lengths=lens).logits
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="rows"):
        model(ids[:1], user_context=ctx)
    with pytest.raises(ValueError, match="not both"):
        model(ids, user_context=ctx, features=feats, lengths=lens)


def test_encoder_mask_must_be_right_padded():
    class BadEncoder(ToyEncoder):
        def forward(self, features, lengths):
            out = super().forward(features, lengths)
            out.mask = out.mask.flip(1)
            return out

    model = UserLLM(tiny_llm("llama"), BadEncoder([20, 5]), UserLLMConfig())
    feats, lens = toy_features([3, 1])
    with pytest.raises(ValueError, match="right padded"):
        model.encode_users(feats, lens)


def test_bad_configs_are_value_errors():
    for bad in (dict(integration="prefix"), dict(xattn_every=0), dict(perceiver_latents=-1), dict(dropout=1.5)):
        with pytest.raises(ValueError):
            UserLLMConfig(**bad)
    with pytest.raises(ValueError, match="xattn layers"):
        UserLLM(tiny_llm("llama"), ToyEncoder([20, 5]), UserLLMConfig(xattn_layers=(5,)))
    with pytest.raises(ValueError, match="encoder width"):
        UserLLM(tiny_llm("llama"), torch.nn.Linear(2, 2), UserLLMConfig())


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    feats, lens = toy_features([5, 2, 0])
    ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(5))

    def grads(checkpointing):
        torch.manual_seed(0)
        model = UserLLM(tiny_llm("llama"), ToyEncoder([20, 5]), UserLLMConfig())
        open_gates(model, 0.5)
        model.train()
        if checkpointing:
            enable_activation_checkpointing(model.llm, use_reentrant=reentrant)
        model(ids, features=feats, lengths=lens, labels=ids).loss.backward()
        return model.encoder.out.weight.grad, model.xattn[1].q_proj.weight.grad

    from transformers.modeling_layers import GradientCheckpointingLayer

    if reentrant and "__call__" in GradientCheckpointingLayer.__dict__:   # transformers 5.17: refused, clearly
        with pytest.raises(ValueError, match="use_reentrant=False"):
            grads(True)
        return
    for plain, checkpointed in zip(grads(False), grads(True)):
        assert torch.allclose(plain, checkpointed, atol=1e-6)


def test_deepcopy_keeps_blocks_wired_to_the_copy():
    model = UserLLM(tiny_llm("gpt2"), ToyEncoder([20, 5]), UserLLMConfig())
    open_gates(model, 0.5)
    clone = copy.deepcopy(model)
    feats, lens = toy_features([4, 1])
    ids = torch.randint(3, 96, (2, 5))
    with torch.no_grad():
        before = model(ids, features=feats, lengths=lens).logits
        assert torch.equal(clone(ids, features=feats, lengths=lens).logits, before)
        for block in clone.xattn:
            block.attn_gate.zero_()
            block.ffn_gate.zero_()
        assert torch.equal(clone(ids, features=feats, lengths=lens).logits, clone.llm(input_ids=ids).logits)
        assert torch.equal(model(ids, features=feats, lengths=lens).logits, before)


def test_gate_init_sets_every_cross_attention_gate():
    model = UserLLM(tiny_llm("llama"), ToyEncoder([20, 5]), UserLLMConfig(gate_init=0.25))
    gates = [p for n, p in model.xattn.named_parameters() if n.endswith("_gate")]
    assert len(gates) == 2 * len(model.xattn) and all(torch.equal(g, torch.full((1,), 0.25)) for g in gates)
    closed = UserLLM(tiny_llm("llama"), ToyEncoder([20, 5]), UserLLMConfig())
    assert all(torch.equal(p, torch.zeros(1)) for n, p in closed.xattn.named_parameters() if n.endswith("_gate"))
