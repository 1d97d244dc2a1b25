"""Soft-prompt integration: prefix layout, masks/labels/positions, incremental decoding, generation."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from userllm.integration import SoftPrompt, UserLLM, UserLLMConfig
from userllm.integration.soft_prompt import position_ids_from_mask, prepend
from userllm.integration.testing import ToyEncoder, single_thread, tiny_llm, toy_features


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def make_model(family="llama", **cfg):
    cfg = {"task_prompt_len": 3, **cfg}
    return UserLLM(tiny_llm(family), ToyEncoder([20, 5]), UserLLMConfig(integration="softprompt", **cfg))


def test_prefix_right_aligns_user_tokens_before_the_task_prompt():
    sp = SoftPrompt(4, task_prompt_len=2)
    states = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4) + 1
    prefix, mask = sp.build_prefix(states, torch.tensor([2, 0]), batch_size=2)
    assert prefix.shape == (2, 5, 4)
    assert mask.tolist() == [[0, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert torch.equal(prefix[0, 1:3], states[0, :2]) and prefix[0, 0].abs().sum() == 0
    assert prefix[1, :3].abs().sum() == 0
    assert torch.equal(prefix[:, 3:], sp.task_prompt.detach().expand(2, 2, 4))
    only_task, task_mask = sp.build_prefix(None, None, batch_size=3)
    assert only_task.shape == (3, 2, 4) and task_mask.tolist() == [[1, 1]] * 3


def test_prepend_extends_mask_labels_and_positions():
    prefix, prefix_mask = torch.zeros(1, 3, 4), torch.tensor([[0, 1, 1]])
    embeds = torch.ones(1, 2, 4)
    labels = torch.tensor([[7, 8]])
    inputs, mask, new_labels, pos = prepend(prefix, prefix_mask, embeds, torch.tensor([[1, 0]]), labels)
    assert inputs.shape == (1, 5, 4)
    assert mask.tolist() == [[0, 1, 1, 1, 0]]
    assert new_labels.tolist() == [[-100, -100, -100, 7, 8]]
    assert pos.tolist() == position_ids_from_mask(mask).tolist() == [[0, 0, 1, 2, 0]]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_logits_align_with_text_and_padding_is_invisible(family):
    model = make_model(family)
    feats, lens = toy_features([4, 2, 0], max_len=5)
    ids = torch.randint(3, 96, (3, 6))
    with torch.no_grad():
        out = model(ids, features=feats, lengths=lens, labels=ids)
        assert out.logits.shape == (3, 6, 96) and torch.isfinite(out.loss)
        # padded event slots and longer padding change nothing
        feats2, lens2 = toy_features([4, 2, 0], max_len=8, seed=1)
        for f, f2 in zip(feats, feats2):
            f2[:, :5] = f
            f2[:, 5:] = -1
        assert torch.allclose(model(ids, features=feats2, lengths=lens2).logits, out.logits, atol=1e-5)
        # the user history matters
        feats3 = [f.clone() for f in feats]
        feats3[0][0, 0] = (feats3[0][0, 0] + 1) % 20
        changed = model(ids, features=feats3, lengths=lens).logits
        assert not torch.allclose(changed[0], out.logits[0]) and torch.allclose(changed[1:], out.logits[1:], atol=1e-6)
        # a row without history sees just the task prompt, like a request without users
        no_user = model(ids[2:], user_context=None).logits
        assert torch.allclose(no_user, out.logits[2:], atol=1e-5)


def test_incremental_decoding_matches_full_forward():
    model = make_model("llama")
    feats, lens = toy_features([5, 1])
    ids = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        ctx = model.prepare_user_context(feats, lens)
        full = model(ids, user_context=ctx).logits
        cache = DynamicCache()
        out = model(ids[:, :4], user_context=ctx, past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for t in range(4, 7):
            out = model(ids[:, t:t + 1], attention_mask=torch.ones(2, t + 1, dtype=torch.long), user_context=ctx,
                        past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_returns_prompt_plus_greedy_tokens(family):
    model = make_model(family, perceiver_latents=2)
    feats, lens = toy_features([4, 0])
    ids = torch.randint(3, 96, (2, 4))
    seqs = model.generate(ids, features=feats, lengths=lens, max_new_tokens=4, do_sample=False)
    assert seqs.shape == (2, 8) and torch.equal(seqs[:, :4], ids)
    cur = ids
    with torch.no_grad():                         # reference: greedy argmax with full recomputation
        for _ in range(4):
            nxt = model(cur, features=feats, lengths=lens).logits[:, -1].argmax(-1, keepdim=True)
            cur = torch.cat([cur, nxt], dim=1)
    assert torch.equal(seqs, cur)


@pytest.mark.parametrize("integration", ["softprompt", "xattn"])
def test_constraints_see_prompt_plus_new_tokens_in_both_integrations(integration):
    model = UserLLM(tiny_llm("llama"), ToyEncoder([20, 5]), UserLLMConfig(integration=integration))
    feats, lens = toy_features([4, 2])
    ids = torch.randint(3, 96, (2, 4))
    allowed = [10, 11, 12]
    seen = []

    def fn(batch_id, sent):
        assert torch.equal(sent[:4], ids[batch_id])
        seen.append(len(sent))
        return allowed

    class Ban11(LogitsProcessor):
        def __call__(self, input_ids, scores):
            assert torch.equal(input_ids[:, :4], ids.repeat_interleave(2, dim=0))
            scores[:, 11] = -float("inf")
            return scores

    seqs = model.generate(ids, features=feats, lengths=lens, max_new_tokens=3, num_beams=2, do_sample=False,
                          prefix_allowed_tokens_fn=fn, logits_processor=LogitsProcessorList([Ban11()]))
    assert torch.equal(seqs[:, :4], ids) and set(seqs[:, 4:].flatten().tolist()) <= {10, 12}
    assert min(seen) == 4 and max(seen) == 6


def test_prefix_mask_alone_equals_the_mask_of_the_built_prefix():
    sp = SoftPrompt(4, task_prompt_len=3)
    lengths = torch.tensor([0, 2, 5])
    _, mask = sp.build_prefix(torch.randn(3, 5, 4), lengths, 3)
    assert torch.equal(sp.prefix_mask(lengths, 5, 3), mask)
    assert torch.equal(sp.prefix_mask(None, 0, 2), sp.build_prefix(None, None, 2)[1])
