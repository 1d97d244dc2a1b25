"""Training strategies: exactly which parameter groups train in full / lora / enc / proj."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from userllm.integration import UserLLM, UserLLMConfig, apply_strategy, find_decoder_layers, parameter_groups
from userllm.integration.strategies import lora_target_modules
from userllm.integration.testing import ToyEncoder, sgd_steps, single_thread, tiny_llm, toy_features

# group -> trains? ("llm.lora" = the LoRA adapters inside the LLM)
EXPECTED = {
    "full": {"llm": True, "encoder": True, "integration": True},
    "lora": {"llm": False, "llm.lora": True, "encoder": True, "integration": True},
    "enc": {"llm": False, "encoder": True, "integration": True},
    "proj": {"llm": False, "encoder": False, "integration": True},
}


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def make_model(family, integration, latents=0):
    cfg = UserLLMConfig(integration=integration, perceiver_latents=latents, task_prompt_len=2)
    return UserLLM(tiny_llm(family), ToyEncoder([20, 5]), cfg)


def group_of(name: str) -> str:
    top = name.split(".", 1)[0]
    if top == "llm":
        return "llm.lora" if "lora_" in name else "llm"
    return top if top == "encoder" else "integration"


@pytest.mark.parametrize("integration,latents", [("xattn", 0), ("xattn", 2), ("softprompt", 2)])
@pytest.mark.parametrize("strategy", ["full", "lora", "enc", "proj"])
def test_trainable_parameter_sets(strategy, integration, latents):
    model = make_model("llama", integration, latents)
    apply_strategy(model, strategy)
    seen = {}
    for name, p in model.named_parameters():
        g = group_of(name)
        seen.setdefault(g, set()).add(p.requires_grad)
    assert {g: flags == {True} for g, flags in seen.items()} == EXPECTED[strategy]
    # the integration group holds exactly the integration's modules
    tops = {n.split(".", 1)[0] for n, _ in model.named_parameters() if group_of(n) == "integration"}
    expected_tops = {"projection", "xattn" if integration == "xattn" else "soft_prompt"}
    assert tops == expected_tops | ({"perceiver"} if latents else set())
    counts = parameter_groups(model)
    assert counts["llm"]["trainable"] == (counts["llm"]["total"] if strategy == "full" else 0)


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_freeze_encoder_keeps_the_encoder_under_full_and_lora(strategy):
    model = make_model("llama", "xattn")
    apply_strategy(model, strategy, freeze_encoder=True)
    seen = {}
    for name, p in model.named_parameters():
        seen.setdefault(group_of(name), set()).add(p.requires_grad)
    assert {g: flags == {True} for g, flags in seen.items()} == {**EXPECTED[strategy], "encoder": False}


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_lora_targets_every_linear_of_the_decoder_layers(family):
    model = make_model(family, "xattn")
    targets, conv1d = lora_target_modules(model.llm)
    assert conv1d == (family == "gpt2")
    path, layers = find_decoder_layers(model.llm)
    n_linear = sum(isinstance(m, (nn.Linear, Conv1D)) for layer in layers for m in layer.modules())
    assert len(targets) == n_linear and all(t.startswith(path + ".") for t in targets)
    apply_strategy(model, "lora", lora_r=4)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.llm.named_modules() if n.endswith(".lora_A")}
    assert adapted == set(targets)
    lora_a = [m for n, m in model.llm.named_modules() if n.endswith("lora_A")]
    assert all(m["default"].out_features == 4 for m in lora_a)
    # output head and embeddings are not adapted; the cross-attention blocks are outside the LLM
    assert not any("lm_head" in t or "embed" in t or "wte" in t for t in targets)


@pytest.mark.parametrize("family,integration", [("gpt2", "xattn"), ("llama", "softprompt")])
def test_lora_training_moves_only_adapters_and_user_side(family, integration):
    torch.manual_seed(0)
    model = make_model(family, integration)
    apply_strategy(model, "lora", lora_r=4)
    apply_strategy(model, "lora")                         # idempotent: no second adapter
    assert sum(n.endswith("lora_A") for n, _ in model.llm.named_modules()) == len(lora_target_modules(model.llm)[0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    feats, lens = toy_features([4, 2])
    ids = torch.randint(3, 96, (2, 5))
    sgd_steps(model, ids, feats, lens, steps=3)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(group_of(n) != "llm" for n in moved)
    assert any(group_of(n) == "llm.lora" for n in moved) and any(group_of(n) == "encoder" for n in moved)


def real_encoder(kind: str) -> nn.Module:
    from userllm.encoders import build_encoder

    specs = [dict(name="item", num_embeddings=20), dict(name="rating", num_embeddings=5)]
    extra = {"fusion": "attention", "num_user_embeddings": 2} if kind == "dual" else {}
    return build_encoder(kind, dict(feature_specs=specs, d_model=16, n_layers=1, n_heads=2, max_len=8, **extra))


@pytest.mark.parametrize("kind, heads", [("ar", {"head_proj", "head_bias"}), ("dual", {"label_mlp"})])
@pytest.mark.parametrize("strategy", ["full", "lora", "enc", "proj"])
@pytest.mark.parametrize("integration", ["xattn", "softprompt"])
def test_pretraining_heads_are_frozen_and_every_trainable_parameter_gets_a_gradient(kind, heads, strategy,
                                                                                   integration):
    """What lets DDP run without find_unused_parameters: one step touches every trainable parameter."""
    torch.manual_seed(0)
    model = UserLLM(tiny_llm("llama"), real_encoder(kind),
                    UserLLMConfig(integration=integration, task_prompt_len=2, gate_init=0.1))
    apply_strategy(model, strategy, lora_r=4)
    frozen = {n.split(".", 1)[0] for n, p in model.encoder.named_parameters() if not p.requires_grad}
    assert frozen == (heads if strategy != "proj" else {n.split(".", 1)[0] for n, _ in model.encoder.named_parameters()})
    feats, lens = toy_features([4, 2, 3])
    ids = torch.randint(3, 96, (3, 5))
    model.train()
    model(ids, features=feats, lengths=lens, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_unknown_strategy_is_a_value_error():
    with pytest.raises(ValueError, match="strategy"):
        apply_strategy(make_model("llama", "xattn"), "adapters")
