"""User K/V cache: projected once per request, reused by every decoding step, following beams."""

from __future__ import annotations

import pytest
import torch

from userllm.integration import UserContext, UserLLM, UserLLMConfig
from userllm.integration.testing import ToyEncoder, open_gates, single_thread, tiny_llm, toy_features

NEW = 5


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def make_model(family="llama", **cfg):
    torch.manual_seed(0)
    model = UserLLM(tiny_llm(family, layers=3), ToyEncoder([20, 5]), UserLLMConfig(integration="xattn", **cfg))
    open_gates(model, 1.0)               # so that the user side changes what is generated
    return model.eval()


class ProjectionCounter:
    """Counts calls of every block's k_proj / v_proj."""

    def __init__(self, model):
        self.calls = 0
        self.handles = [getattr(b, name).register_forward_hook(self.hit) for b in model.xattn
                        for name in ("k_proj", "v_proj")]

    def hit(self, *_):
        self.calls += 1

    def reset(self):
        self.calls = 0


def test_user_context_index_select_and_repeat_interleave():
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 1, 4)
    ctx = UserContext(torch.arange(3.0).view(3, 1, 1).expand(3, 2, 4), torch.tensor([2, 0, 1]), (k,), (k + 10,))
    rep = ctx.repeat_interleave(2)
    assert rep.batch_size == 6 and rep.kv_lengths.tolist() == [2, 2, 0, 0, 1, 1]
    assert rep.keys[0][:, 0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2] and rep.values[0][3, 0, 0, 0] == 11
    sel = rep.index_select(torch.tensor([5, 0]))
    assert sel.kv_lengths.tolist() == [1, 2] and sel.states[:, 0, 0].tolist() == [2.0, 0.0]
    assert UserContext(ctx.states, ctx.kv_lengths).repeat_interleave(3).keys is None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kv_projected_once_per_request_and_tokens_equal_uncached(family):
    model = make_model(family, xattn_kv_heads=2)
    counter = ProjectionCounter(model)
    feats, lens = toy_features([6, 3, 0])
    ids = torch.randint(3, 96, (3, 4), generator=torch.Generator().manual_seed(1))
    n_proj = 2 * len(model.xattn)
    cached = model.generate(ids, features=feats, lengths=lens, max_new_tokens=NEW, do_sample=False)
    assert counter.calls == n_proj                              # at prefill, never again
    counter.reset()
    uncached = model.generate(ids, features=feats, lengths=lens, max_new_tokens=NEW, do_sample=False,
                              cache_user_kv=False)
    assert counter.calls == n_proj * NEW                        # prefill + NEW - 1 decode steps
    assert torch.equal(cached, uncached)
    # a context prepared by the caller is reused as is: zero projections during generation
    ctx = model.prepare_user_context(feats, lens)
    counter.reset()
    assert torch.equal(model.generate(ids, user_context=ctx, max_new_tokens=NEW, do_sample=False), cached)
    assert counter.calls == 0
    # and the users matter: without them the LLM generates something else
    assert not torch.equal(model.generate(ids, max_new_tokens=NEW, do_sample=False), cached)


def test_beam_search_cached_equals_uncached_and_follows_each_request():
    model = make_model("llama")
    counter = ProjectionCounter(model)
    feats, lens = toy_features([6, 2])
    ids = torch.randint(3, 96, (2, 4), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=NEW, num_beams=3, num_return_sequences=3, do_sample=False, early_stopping=True)
    cached = model.generate(ids, features=feats, lengths=lens, **kw)
    assert counter.calls == 2 * len(model.xattn) and cached.shape[0] == 6
    uncached = model.generate(ids, features=feats, lengths=lens, cache_user_kv=False, **kw)
    assert torch.equal(cached, uncached)
    # beams of one request only ever read that request's user: batching changes nothing
    for b in range(2):
        alone = model.generate(ids[b:b + 1], features=[f[b:b + 1] for f in feats], lengths=lens[b:b + 1], **kw)
        assert torch.equal(alone, cached[3 * b:3 * b + 3])


def test_sampling_with_several_sequences_matches_uncached():
    model = make_model("gpt_neox")
    feats, lens = toy_features([5, 1])
    ids = torch.randint(3, 96, (2, 3), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=NEW, do_sample=True, top_k=10, num_return_sequences=2)
    torch.manual_seed(7)
    cached = model.generate(ids, features=feats, lengths=lens, **kw)
    torch.manual_seed(7)
    uncached = model.generate(ids, features=feats, lengths=lens, cache_user_kv=False, **kw)
    assert cached.shape == (4, 3 + NEW) and torch.equal(cached, uncached)


def test_manual_decoding_with_past_and_reordered_context():
    """The path of a custom decoder: forward step by step, reordering the context with the beams."""
    model = make_model("llama")
    feats, lens = toy_features([6, 2, 4])
    ids = torch.randint(3, 96, (3, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ctx = model.prepare_user_context(feats, lens)
        full = model(ids, user_context=ctx).logits
        out = model(ids[:, :3], user_context=ctx, use_cache=True)
        logits = [out.logits]
        for t in (3, 4):
            out = model(ids[:, t:t + 1], user_context=ctx, past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits)
        assert torch.allclose(torch.cat(logits, dim=1), full, atol=1e-5)
        perm = torch.tensor([2, 0, 1])
        reordered = model(ids[perm], user_context=ctx.index_select(perm)).logits
        assert torch.allclose(reordered, full[perm], atol=1e-5)


def test_user_lengths_are_validated_once_per_request_not_per_layer_and_step(monkeypatch):
    """The kv_lengths range check syncs a GPU with the host; it must not run per layer per decode step."""
    model = make_model("llama")
    feats, lens = toy_features([6, 3])
    ids = torch.randint(3, 96, (2, 4), generator=torch.Generator().manual_seed(5))
    reads = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda x: reads.append(x.shape) or real(x))
    counts = []
    for new in (2, 2 * NEW):
        reads.clear()
        model.generate(ids, features=feats, lengths=lens, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        counts.append(len(reads))
    assert len(model.xattn) == 3 and counts[0] == counts[1] <= 2, counts
