"""Gated cross-attention blocks and their insertion into HF decoder layers found by structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from userllm.integration import GatedCrossAttentionBlock, UserLLM, UserLLMConfig, find_decoder_layers
from userllm.integration.cross_attention import CrossAttentionHook, attach_cross_attention
from userllm.integration.layers import UserContext
from userllm.integration.testing import FAMILIES, ToyEncoder, open_gates, single_thread, tiny_llm, toy_features

EXPECTED_PATHS = {"llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers",
                  "gemma": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def make_model(family="llama", **cfg):
    return UserLLM(tiny_llm(family), ToyEncoder([20, 5]), UserLLMConfig(integration="xattn", **cfg))


def random_gates(block: GatedCrossAttentionBlock) -> None:
    with torch.no_grad():
        block.attn_gate.fill_(0.7)
        block.ffn_gate.fill_(-0.4)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layers_found_by_structure(family):
    llm = tiny_llm(family, layers=3)
    path, layers = find_decoder_layers(llm)
    assert path == EXPECTED_PATHS[family]
    assert len(layers) == 3 and layers is llm.get_submodule(path)


def test_decoder_layers_prefers_outer_list_over_nested_lists():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(8))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(2))

    path, layers = find_decoder_layers(Net())
    assert path == "blocks" and len(layers) == 2


def test_block_is_identity_at_init_and_gates_open_it():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(32, n_heads=4, n_kv_heads=2)
    h = torch.randn(2, 5, 32)
    k, v = block.project_kv(torch.randn(2, 6, 32))
    lengths = torch.tensor([6, 3])
    assert torch.equal(block(h, k, v, lengths), h)
    random_gates(block)
    assert not torch.allclose(block(h, k, v, lengths), h)


def test_block_leaves_rows_without_history_untouched():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(32, n_heads=4)
    random_gates(block)
    h = torch.randn(3, 4, 32)
    k, v = block.project_kv(torch.randn(3, 5, 32))
    out = block(h, k, v, torch.tensor([5, 0, 2]))
    assert torch.equal(out[1], h[1])
    assert not torch.allclose(out[0], h[0]) and not torch.allclose(out[2], h[2])


def test_block_masks_padding_and_is_not_causal():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(32, n_heads=4)
    random_gates(block)
    h = torch.randn(1, 3, 32)
    states = torch.randn(1, 6, 32)
    lengths = torch.tensor([4])
    base = block(h, *block.project_kv(states), lengths)
    padded = states.clone()
    padded[:, 4:] = 100.0                      # beyond the length: must be invisible
    assert torch.allclose(block(h, *block.project_kv(padded), lengths), base, atol=1e-6)
    last = states.clone()
    last[:, 3] = torch.randn(32)               # last real event: visible to the FIRST text position too
    assert not torch.allclose(block(h, *block.project_kv(last), lengths)[:, 0], base[:, 0])


def test_grouped_query_heads_match_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = GatedCrossAttentionBlock(32, n_heads=4, n_kv_heads=2)
    mha = GatedCrossAttentionBlock(32, n_heads=4, n_kv_heads=4)
    shared = {k: v for k, v in gqa.state_dict().items() if not k.startswith(("k_proj", "v_proj"))}
    mha.load_state_dict(shared, strict=False)             # everything but k/v (different shapes)
    D = gqa.head_dim
    with torch.no_grad():   # query head h of GQA reads kv head h // 2: replicate those heads for MHA
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(2, D, 32)
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(4 * D, 32))
    random_gates(gqa)
    random_gates(mha)
    h, states, lengths = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.tensor([7, 2])
    k, v = gqa.project_kv(states)
    assert k.shape == (2, 7, 2, D)
    assert torch.allclose(gqa(h, k, v, lengths), mha(h, *mha.project_kv(states), lengths), atol=1e-5)
    with pytest.raises(ValueError):
        GatedCrossAttentionBlock(32, n_heads=4, n_kv_heads=3)


class TupleLayer(nn.Module):
    """A decoder layer in the old style: positional/keyword extras, returns a tuple."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 32)

    def forward(self, hidden_states, extra=None, *, scale=1.0, flag=None):
        return self.lin(hidden_states) * scale, extra, flag


class Owner(nn.Module):
    def __init__(self, ctx):
        super().__init__()
        self.xattn = nn.ModuleList([GatedCrossAttentionBlock(32, 4)])
        random_gates(self.xattn[0])
        self.ctx = ctx

    def context_for_batch(self, batch):
        return self.ctx


def test_hook_passes_args_kwargs_and_tuple_outputs_through():
    torch.manual_seed(0)
    states = torch.randn(2, 3, 32)
    owner = Owner(UserContext(states, torch.tensor([3, 1])))
    layers = nn.ModuleList([TupleLayer()])
    h = torch.randn(2, 4, 32)
    plain = layers[0](h, "x", scale=2.0, flag=True)
    attach_cross_attention(layers, [0], lambda i: CrossAttentionHook(owner, i))
    expected_in = owner.xattn[0](h, *owner.xattn[0].project_kv(states), torch.tensor([3, 1]))
    for call in (lambda: layers[0](h, "x", scale=2.0, flag=True),
                 lambda: layers[0](hidden_states=h, extra="x", scale=2.0, flag=True)):
        out = call()
        assert isinstance(out, tuple) and out[1:] == ("x", True)
        assert torch.allclose(out[0], layers[0].lin(expected_in) * 2.0)
        assert not torch.allclose(out[0], plain[0])
    owner.ctx = None                           # no user context: the layer runs exactly as before
    assert torch.equal(layers[0](h, "x", scale=2.0, flag=True)[0], plain[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_gates_at_zero_leave_llm_output_exactly_unchanged(family):
    model = make_model(family)
    feats, lens = toy_features([5, 2, 0])
    ids = torch.randint(3, 96, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        plain = model.llm(input_ids=ids, attention_mask=mask).logits
        ours = model(ids, mask, features=feats, lengths=lens).logits
    assert torch.equal(ours, plain)
    open_gates(model)
    with torch.no_grad():
        changed = model(ids, mask, features=feats, lengths=lens).logits
    assert not torch.allclose(changed[0], plain[0])


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_rows_without_history_skip_every_block(family):
    model = make_model(family)
    open_gates(model, 0.9)
    feats, lens = toy_features([4, 0, 3])
    ids = torch.randint(3, 96, (3, 5))
    with torch.no_grad():
        plain = model.llm(input_ids=ids).logits
        ours = model(ids, features=feats, lengths=lens).logits
    assert torch.equal(ours[1], plain[1])
    assert not torch.allclose(ours[0], plain[0]) and not torch.allclose(ours[2], plain[2])


def test_blocks_every_k_layers_with_gqa_heads():
    model = UserLLM(tiny_llm("qwen2", layers=4), ToyEncoder([20, 5]),
                    UserLLMConfig(xattn_every=2, xattn_heads=4, xattn_kv_heads=1))
    assert model.xattn_layer_indices == [0, 2] and len(model.xattn) == 2
    assert model.xattn[0].k_proj.out_features == model.xattn[0].head_dim
    _, layers = find_decoder_layers(model.llm)
    assert [len(l._forward_pre_hooks) for l in layers] == [1, 0, 1, 0]
    explicit = UserLLM(tiny_llm("qwen2", layers=4), ToyEncoder([20, 5]), UserLLMConfig(xattn_layers=(3,)))
    assert explicit.xattn_layer_indices == [3]
    # the LLM's own parameter names are untouched (checkpoints / LoRA names of the stock model)
    stock = {n for n, _ in tiny_llm("qwen2", layers=4).named_parameters()}
    assert {n for n, _ in model.llm.named_parameters()} == stock
