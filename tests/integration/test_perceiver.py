"""Perceiver resampler: latents over a padded history, lengths, masking; inside both integrations."""

from __future__ import annotations

import pytest
import torch

from userllm.integration import PerceiverResampler, UserLLM, UserLLMConfig
from userllm.integration.perceiver import PerceiverLayer
from userllm.integration.testing import ToyEncoder, single_thread, tiny_llm, toy_features


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_shapes_and_output_lengths():
    torch.manual_seed(0)
    p = PerceiverResampler(32, n_latents=4, n_layers=2, n_heads=4)
    events = torch.randn(3, 10, 32)
    out, lengths = p(events, torch.tensor([10, 3, 0]))
    assert out.shape == (3, 4, 32) and torch.isfinite(out).all()
    assert lengths.tolist() == [4, 4, 0] and lengths.dtype == torch.int64


def test_padded_events_are_invisible_and_real_ones_matter():
    torch.manual_seed(0)
    p = PerceiverResampler(32, n_latents=3, n_layers=2, n_heads=2)
    events = torch.randn(2, 6, 32)
    lengths = torch.tensor([4, 6])
    base, _ = p(events, lengths)
    noisy = events.clone()
    noisy[0, 4:] = torch.randn(2, 32) * 50
    out, _ = p(noisy, lengths)
    assert torch.allclose(out, base, atol=1e-5)
    noisy[0, 0] = torch.randn(32)
    out, _ = p(noisy, lengths)
    assert not torch.allclose(out[0], base[0]) and torch.allclose(out[1], base[1], atol=1e-6)


def test_shared_latents_equal_per_row_latents():
    torch.manual_seed(0)
    layer = PerceiverLayer(32, n_heads=4)
    latents, events, lengths = torch.randn(5, 32), torch.randn(2, 7, 32), torch.tensor([7, 2])
    shared = layer(latents, events, lengths)
    per_row = layer(latents.expand(2, 5, 32), events, lengths)
    assert shared.shape == (2, 5, 32) and torch.allclose(shared, per_row, atol=1e-6)


def test_gradients_reach_latents_and_events():
    torch.manual_seed(0)
    p = PerceiverResampler(16, n_latents=2, n_layers=1, n_heads=2)
    events = torch.randn(2, 5, 16, requires_grad=True)
    out, _ = p(events, torch.tensor([5, 2]))
    out.square().sum().backward()
    assert p.latents.grad.abs().sum() > 0
    assert events.grad[0].abs().sum() > 0 and events.grad[1, 2:].abs().sum() == 0


@pytest.mark.parametrize("integration", ["xattn", "softprompt"])
def test_perceiver_inside_userllm(integration):
    cfg = UserLLMConfig(integration=integration, perceiver_latents=4, perceiver_layers=2, task_prompt_len=2)
    model = UserLLM(tiny_llm("llama"), ToyEncoder([20, 5]), cfg)
    feats, lens = toy_features([9, 1, 0])
    states, kv_lengths = model.encode_users(feats, lens)
    assert states.shape == (3, 4, model.d_llm) and kv_lengths.tolist() == [4, 4, 0]
    assert model.num_prefix_tokens(50) == (0 if integration == "xattn" else 4 + 2)
    ids = torch.randint(3, 96, (3, 5))
    out = model(ids, features=feats, lengths=lens, labels=ids)
    assert out.logits.shape == (3, 5, 96) and torch.isfinite(out.loss)
