"""Analytic FLOPs equal torch's FlopCounterMode counts exactly on plain blocks, per component and phase."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from userllm.profiling.flops import (ComponentFlopCounter, FlopBreakdown, TransformerShape, attention_flops,
                                     count_flops, hf_transformer_shape, linear_flops, linear_params)


def test_linear_stack_forward_and_training_match_analytic():
    torch.manual_seed(0)
    dims = [12, 32, 24, 5]
    stack = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 24, bias=False), nn.Tanh(), nn.Linear(24, 5))
    x = torch.randn(3, 7, 12, requires_grad=True)
    rows = 3 * 7
    analytic = sum(linear_flops(rows, a, b) for a, b in zip(dims, dims[1:]))
    assert analytic == 2 * rows * linear_params(stack)

    with ComponentFlopCounter() as fc:
        stack(x)
    assert fc.get_total_flops() == analytic

    with ComponentFlopCounter({"first": stack[0], "rest": [stack[2], stack[4]]}) as fc:
        stack(x).square().sum().backward()
    comp = fc.component_flops()
    assert comp["first"] == {"forward": linear_flops(rows, 12, 32), "backward": 2 * linear_flops(rows, 12, 32),
                             "total": 3 * linear_flops(rows, 12, 32)}
    rest = linear_flops(rows, 32, 24) + linear_flops(rows, 24, 5)
    assert comp["rest"]["forward"] == rest and comp["rest"]["backward"] == 2 * rest
    assert fc.get_total_flops() == 3 * analytic          # the paper's 6ND = 3 x 2ND


class AttentionBlock(nn.Module):
    """Plain multi-head self-attention: fused QKV projection, SDPA, output projection."""

    def __init__(self, d: int, heads: int, fused: bool):
        super().__init__()
        self.h, self.fused = heads, fused
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # plain matmuls (what the reference kernels do)
            s = (q @ k.transpose(-1, -2)) * (C // self.h) ** -0.5
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            y = torch.softmax(s, -1) @ v
        return self.out(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("fused", [True, False])
def test_attention_block_matches_analytic(fused):
    torch.manual_seed(0)
    B, T, d, h = 2, 9, 32, 4
    block = AttentionBlock(d, h, fused)
    x = torch.randn(B, T, d, requires_grad=True)
    shape = TransformerShape(linear_params(block), n_layers=1, d_attn=d, fused_attention=fused)
    expected_fwd = linear_flops(B * T, d, 3 * d) + linear_flops(B * T, d, d) + attention_flops(B, h, T, T, d // h)
    assert shape.forward(B, T) == expected_fwd

    with ComponentFlopCounter({"block": block}) as fc:
        block(x)
    assert fc.get_total_flops() == expected_fwd

    with ComponentFlopCounter({"block": block}) as fc:
        block(x).sum().backward()
    comp = fc.component_flops()["block"]
    assert comp["forward"] == shape.forward(B, T)
    assert comp["backward"] == shape.backward(B, T)
    assert fc.get_total_flops() == shape.train(B, T)


def test_nested_components_and_backward_attribution():
    """An inner component inside an outer one is counted apart; backward follows the forward's owner."""
    torch.manual_seed(0)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.inner = nn.Linear(8, 8)
            self.b = nn.Linear(8, 4)

        def forward(self, x):
            return self.b(self.inner(self.a(x)))

    enc = nn.Linear(6, 8)
    outer = Outer()
    x = torch.randn(5, 6)
    with ComponentFlopCounter({"encoder": enc, "llm": outer, "xattn": outer.inner}) as fc:
        loss = (outer(enc(x)) @ torch.ones(4, 1)).sum()       # glue code after the components: "other"
        loss.backward()
    c = fc.component_flops()
    assert c["encoder"]["forward"] == linear_flops(5, 6, 8)
    # x needs no grad: the encoder's backward only computes the weight gradient
    assert c["encoder"]["backward"] == linear_flops(5, 6, 8)
    assert c["xattn"] == {"forward": linear_flops(5, 8, 8), "backward": 2 * linear_flops(5, 8, 8),
                          "total": 3 * linear_flops(5, 8, 8)}
    llm = linear_flops(5, 8, 8) + linear_flops(5, 8, 4)
    assert c["llm"]["forward"] == llm and c["llm"]["backward"] == 2 * llm
    assert c["other"] == {"forward": linear_flops(5, 4, 1), "backward": linear_flops(5, 4, 1),
                          "total": 2 * linear_flops(5, 4, 1)}
    assert fc.breakdown("total").total == fc.get_total_flops()


def test_hf_llama_prefill_and_training_match_analytic():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    llm = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 6))
    shape = hf_transformer_shape(llm)
    # q, k, v, o, gate, up, down per layer and the LM head
    per_layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64
    assert shape.n_params_matmul == 2 * per_layer + 32 * 64
    _, fc = count_flops(lambda: llm(input_ids=ids), {"llm": llm})
    assert fc.get_total_flops() == shape.forward(2, 6)
    _, fc = count_flops(lambda: llm(input_ids=ids, labels=ids).loss.backward(), {"llm": llm})
    assert fc.component_flops()["llm"]["total"] == shape.train(2, 6)


def test_breakdown_arithmetic():
    a, b = FlopBreakdown({"llm": 10, "encoder": 2}), FlopBreakdown({"llm": 1, "xattn": 3})
    assert (a + b).to_dict() == {"llm": 11, "encoder": 2, "xattn": 3, "total": 16}
    assert a.scaled(0.5).components == {"llm": 5, "encoder": 1}


def test_fused_attention_ops_are_counted_like_sdpa():
    """The Triton attention ops count what SDPA counts for the same problem, forward and backward (both
    recompute the scores in the backward, flash-style, so the backward is 2.5x the forward).

    Run on fake tensors: the ops' registered fake implementations stand in for the kernels, so this
    checks the FLOP formulas and their registration without a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from userllm.kernels.ops.cached_cross_attention import cached_cross_attention as triton_cached
    from userllm.kernels.ops.latent_cross_attention import latent_cross_attention as triton_latent

    B, T, Hq, Hkv, N, D = 2, 3, 4, 2, 5, 16
    lengths = [5, 2]

    def count(fn, fake):
        with FakeTensorMode() if fake else contextlib.nullcontext():
            q = torch.randn(B, T, Hq, D, requires_grad=True)
            k = torch.randn(B, N, Hkv, D, requires_grad=True)
            with ComponentFlopCounter() as counter:
                fn(q, k, torch.tensor(lengths)).sum().backward()
        return counter.get_total_flops()

    def sdpa(q, k, n):
        kk = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2).transpose(1, 2)
        mask = (torch.arange(N)[None, :] < n[:, None])[:, None, None, :]
        return F.scaled_dot_product_attention(q.transpose(1, 2), kk, kk, attn_mask=mask)

    expected = count(sdpa, fake=False)
    assert expected > 0
    assert count(lambda q, k, n: triton_cached(q, k, k, n), fake=True) == expected
    # Perceiver: T latents per head shared by the batch, one query head per KV head.
    assert count(lambda q, k, n: triton_latent(q[0, :, :Hkv], k, k, n), fake=True) == count(
        lambda q, k, n: sdpa(q[:, :, :Hkv], k, n), fake=False)
