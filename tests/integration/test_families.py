"""Model layouts beyond the plain decoder: OPT's projected embeddings, Mamba's recurrent cache, Jamba's
mixed layer list, MoE experts fused in 3-D parameters; and frozen modules staying in eval mode."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from userllm.decoding import UserLLMStepper
from userllm.integration import UserLLM, UserLLMConfig, apply_strategy
from userllm.integration.layers import find_decoder_layers
from userllm.utils.hf import IGNORE, enable_activation_checkpointing
from userllm.integration.soft_prompt import prepend
from userllm.integration.strategies import lora_target_modules, lora_target_parameters
from userllm.integration.testing import (EDGE_FAMILIES, FAMILIES, ToyEncoder, open_gates, sgd_steps, single_thread, tiny_llm,
                                        toy_features)


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def make_model(family: str, integration: str, **cfg) -> UserLLM:
    torch.manual_seed(0)
    return UserLLM(tiny_llm(family), ToyEncoder([20, 5]), UserLLMConfig(integration=integration, **cfg))


def stepped_logits(model: UserLLM, ids: torch.Tensor, feats, lens, split: int) -> torch.Tensor:
    """Logits [B, T, V] from a prefill of ``ids[:, :split]`` then one-token steps through the stepper."""
    stepper = UserLLMStepper(model)
    B, T = ids.shape
    mask = torch.ones_like(ids)
    logits, state = stepper.prefill(ids[:, :split], mask[:, :split], feats, lens)
    out = [logits]
    for t in range(split, T - 1):
        logits, state = stepper(ids[:, t:t + 1], state, torch.arange(B))
        out.append(logits)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("family", EDGE_FAMILIES)
@pytest.mark.parametrize("integration", ["xattn", "softprompt"])
def test_edge_families_train_and_decode_incrementally(family, integration):
    """A training step gives a finite loss and reaches the user side; decoding with the cache, one token at
    a time, gives the logits of the full forward (Mamba: its recurrent state; Jamba: both kinds)."""
    model = make_model(family, integration)
    if integration == "xattn":
        open_gates(model, 0.5)
    feats, lens = toy_features([4, 2])
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    model.train()
    out = model(ids, features=feats, lengths=lens, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.projection.net[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        full = model(ids, features=feats, lengths=lens).logits[:, 2:-1]   # next-token logits after each prefix
        stepped = stepped_logits(model, ids, feats, lens, split=3)
    assert torch.allclose(stepped, full, atol=1e-4), (stepped - full).abs().max()


def test_opt_soft_prompt_uses_the_embedding_width_and_cross_attention_the_residual_width():
    llm = tiny_llm("opt")
    assert llm.config.word_embed_proj_dim != llm.config.hidden_size
    soft = make_model("opt", "softprompt")
    assert soft.soft_prompt.task_prompt.shape[-1] == llm.config.word_embed_proj_dim
    assert soft.projection.net[-1].out_features == llm.config.word_embed_proj_dim
    xattn = make_model("opt", "xattn")
    assert xattn.projection.net[-1].out_features == llm.config.hidden_size


def test_hybrid_layer_list_is_found():
    llm = tiny_llm("jamba", layers=4)
    path, layers = find_decoder_layers(llm)
    assert path == "model.layers" and len(layers) == 4 and len({type(m) for m in layers}) == 2


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "jamba"])
def test_lora_adapts_fused_expert_weights(family):
    model = make_model(family, "xattn")
    experts = lora_target_parameters(model.llm)
    assert experts and all(p.endswith(("gate_up_proj", "down_proj")) and ".experts." in p for p in experts)
    apply_strategy(model, "lora", lora_r=4)
    adapters = [n for n, p in model.llm.named_parameters() if p.requires_grad and ".experts." in n]
    assert adapters and all("lora_" in n for n in adapters)
    # every fused expert weight got its adapter, and training moves it
    before = {n: p.detach().clone() for n, p in model.llm.named_parameters() if n in adapters}
    feats, lens = toy_features([4, 2])
    ids = torch.randint(3, 96, (2, 6))
    sgd_steps(model, ids, feats, lens, steps=2)
    moved = [n for n, p in model.llm.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved and not any(p.requires_grad for n, p in model.llm.named_parameters() if "lora_" not in n)


def test_lora_skips_mamba_maps_its_kernel_reads_directly():
    llm = tiny_llm("mamba")
    targets, _ = lora_target_modules(llm)
    assert targets and not any(t.endswith(("out_proj", "conv1d")) for t in targets)
    assert lora_target_parameters(llm) == []          # the depthwise conv kernel is 3-D but not an expert bank


@pytest.mark.parametrize("strategy,frozen", [("enc", ["llm"]), ("proj", ["llm", "encoder"]), ("full", []),
                                             ("lora", [])])
def test_frozen_modules_stay_in_eval_mode(strategy, frozen):
    torch.manual_seed(0)
    llm = tiny_llm("gpt2", attn_pdrop=0.5, resid_pdrop=0.5, embd_pdrop=0.5)
    model = UserLLM(llm, ToyEncoder([20, 5]), UserLLMConfig())
    apply_strategy(model, strategy, lora_r=2)
    model.train()
    for name in ("llm", "encoder"):
        module = getattr(model, name)
        assert all(m.training == (name not in frozen) for m in module.modules()), name
    assert model.training and all(block.training for block in model.xattn)
    if "llm" in frozen:   # dropout off: the frozen LLM is deterministic in training mode
        ids = torch.randint(3, 96, (2, 6))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    assert not any(m.training for m in model.modules())


def test_frozen_llm_keeps_activation_checkpointing():
    model = UserLLM(tiny_llm("llama"), ToyEncoder([20, 5]), UserLLMConfig())
    enable_activation_checkpointing(model.llm)
    apply_strategy(model, "enc")
    model.train()
    _, layers = find_decoder_layers(model.llm)
    assert all(isinstance(layer, GradientCheckpointingLayer) and layer.training for layer in layers)
    assert not any(m.training for layer in layers for m in layer.modules() if m is not layer)


@pytest.mark.parametrize("family", FAMILIES + EDGE_FAMILIES)
@pytest.mark.parametrize("integration", ["xattn", "softprompt"])
def test_the_target_loss_equals_the_models_own_loss_and_gradients(family, integration):
    """The training loss computes the output head from the first target column on only
    (``forward_with_target_loss``); its loss and gradients are those of the model's own loss over every
    position (targets at different columns, a row without any, padding), to float32 rounding (the two
    compute the head over different row counts; an off-by-one target would differ by O(1))."""
    model = make_model(family, integration)
    if integration == "xattn":
        open_gates(model, 0.5)
    feats, lens = toy_features([4, 2, 3])
    ids = torch.randint(3, 96, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    labels = torch.full_like(ids, IGNORE)
    labels[0, 4:8], labels[1, 6:9] = ids[0, 4:8], ids[1, 6:9]                # row 2: no target
    model.eval()                                                 # no dropout: the two passes see the same net

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours, g_ours = loss_and_grads(lambda: model(ids, attention_mask=mask, features=feats, lengths=lens,
                                                labels=labels).loss)
    if integration == "softprompt":                              # the model's own loss over the whole prefix + text
        def own():
            ctx = model.prepare_user_context(feats, lens)
            prefix, prefix_mask = model._prefix(ctx, 3)
            embeds, m, lab, pos = prepend(prefix, prefix_mask, model.llm.get_input_embeddings()(ids), mask, labels)
            return model.llm(inputs_embeds=embeds, attention_mask=m, position_ids=pos, labels=lab).loss
    else:
        def own():
            with model.use_user_context(model.prepare_user_context(feats, lens)):
                return model.llm(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref, g_ref = loss_and_grads(own)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=0), (float(ours), float(ref))
    assert g_ours.keys() == g_ref.keys() and g_ours
    for n in g_ref:
        assert torch.allclose(g_ours[n], g_ref[n], rtol=1e-4, atol=1e-7), n
