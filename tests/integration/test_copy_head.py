"""The readout's pointer (copy) head: the mixture against a float64 reference written out token by token,
gradients by gradcheck, the ids it writes, its place in the UserLLM (every logits path) and in a run."""

from __future__ import annotations

import json
import random

import pytest
import torch

from userllm.best_first import best_first_search
from userllm.data.dataset import FeatureSpec
from userllm.decoding import Trie, UserLLMStepper, constrained_beam_search
from userllm.encoders import AutoregressiveEncoder, EncoderConfig
from userllm.integration import UserLLM, UserLLMConfig
from userllm.integration.copy_head import CopyHead
from userllm.integration.readout import ids_after, title_token_ids, title_vectors
from userllm.integration.testing import open_gates, single_thread, tiny_llm

pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 2


def _inputs(B=4, T=5, N=9, V=13, d=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=g, dtype=dtype)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * 2
    states = torch.randn(B, N, d, generator=g, dtype=dtype)
    ids = torch.randint(-1, V, (B, N), generator=g)
    ids[:, 0] = 3                                           # a token several places write (summed)
    ids[:, 1] = 3
    ids[2] = -1                                             # a row with nothing to copy
    lengths = torch.tensor([N, 5, N, 0])[:B]                # padding, and an empty row
    return hidden, logits, states, ids, lengths


def _reference(head: CopyHead, hidden, logits, states, ids, lengths) -> torch.Tensor:
    """The mixture written out in float64, position by position."""
    Wq, Wk = head.query.weight.double(), head.key.weight.double()
    wg, bg = head.gate.weight.double()[0], head.gate.bias.double()[0]
    B, T, V = logits.shape
    out = torch.empty(B, T, V, dtype=torch.float64)
    for b in range(B):
        keep = [n for n in range(int(lengths[b])) if ids[b, n] >= 0]
        for t in range(T):
            p = torch.softmax(logits[b, t].double(), -1)
            if keep:
                h = hidden[b, t].double()
                s = torch.stack([(Wq @ h) @ (Wk @ states[b, n].double()) for n in keep]) / Wq.shape[0] ** 0.5
                a = torch.softmax(s, -1)
                copy = torch.zeros(V, dtype=torch.float64)
                for w, n in zip(a, keep):
                    copy[ids[b, n]] += w
                g = torch.sigmoid(wg @ h + bg)
                p = (1 - g) * p + g * copy
            out[b, t] = p.clamp_min(1e-30).log()
    return out


def _trained_head(d=6, seed=1) -> CopyHead:
    torch.manual_seed(seed)
    head = CopyHead(d, d_key=4)
    with torch.no_grad():                                   # an open, input-dependent gate
        head.gate.weight.normal_()
        head.gate.bias.fill_(0.3)
    return head


def test_mixture_matches_a_float64_reference_and_is_a_distribution():
    head = _trained_head()
    x = _inputs(dtype=torch.float32)
    got = head(*x)
    want = _reference(head, *x)
    assert got.dtype == torch.float32
    # float32 against float64: the same computation in float32 errs by ~1e-7 relative on log-probs of O(10)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(4, 5), rtol=0, atol=1e-5)
    own = torch.log_softmax(x[1], -1)
    assert torch.equal(got[2], own[2]) and torch.equal(got[3], own[3])   # nothing to copy: the LLM's own
    assert not torch.allclose(got[0], own[0])


def test_gradients_pass_gradcheck_including_rows_without_copy():
    head = _trained_head().double()
    hidden, logits, states, ids, lengths = _inputs(B=4, T=3, N=7, V=9, d=6, seed=3)
    hidden.requires_grad_(True), logits.requires_grad_(True), states.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h, lg, s: head(h, lg, s, ids, lengths), (hidden, logits, states))
    out = head(hidden, logits, states, ids, lengths)
    out[:, :, 4].sum().backward()          # token 4 may be written by no copyable token: the floor, no NaN
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_title_token_ids_end_with_eos_cut_to_p_and_pad_with_minus_one():
    ids = title_token_ids([[], [5, 6], [7, 8, 9, 10]], 4, EOS)
    assert ids.tolist() == [[-1, -1, -1, -1], [5, 6, EOS, -1], [7, 8, 9, 10]]
    placed = ids_after(torch.tensor([2, 0]), 6, torch.tensor([[4, 5, -1], [7, 8, 9]]))
    assert placed.tolist() == [[-1, -1, 4, 5, -1, -1], [7, 8, 9, -1, -1, -1]]


# ------------------------------------------------------------------------------------- in a UserLLM
ITEMS = 12


def _model(pointer: bool = True, seed: int = 0) -> tuple[UserLLM, list[list[int]]]:
    torch.manual_seed(seed)
    specs = [FeatureSpec("item", ITEMS, False), FeatureSpec("rating", 6, False)]
    enc = AutoregressiveEncoder(EncoderConfig(specs, feature_dims=[8, 4], d_model=16, n_layers=1, n_heads=2,
                                              dropout=0.0, max_len=16)).eval()
    llm = tiny_llm("llama", vocab_size=50, hidden=32, seed=seed)
    model = UserLLM(llm, enc, UserLLMConfig(readout_tokens=3, readout_title_tokens=4,
                                            readout_pointer=pointer)).eval()
    open_gates(model, 0.5)
    titles = [[]] + [[3 + i, 20 + i % 4] + [30 + i] * (i % 3) for i in range(ITEMS - 1)]   # 2-4 tokens
    model.readout.set_title_vectors(title_vectors(llm, titles, 4))
    if pointer:
        model.readout.set_title_ids(title_token_ids(titles, 4, EOS))
    return model, titles


def _features(lengths=(5, 1, 3), seed=2):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    L = int(lens.max())
    pad = torch.arange(L)[None] >= lens[:, None]
    return [torch.randint(1, ITEMS, (len(lens), L), generator=g).masked_fill(pad, -1),
            torch.randint(1, 6, (len(lens), L), generator=g).masked_fill(pad, -1)], lens


def test_a_shut_pointer_is_the_model_without_it_and_an_open_one_writes_the_candidates_tokens():
    model, titles = _model()
    plain, _ = _model(pointer=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if "copy_head" not in k and "title_ids" not in k})
    feats, lens = _features()
    x = torch.randint(3, 50, (3, 6), generator=torch.Generator().manual_seed(4))
    ctx = model.prepare_user_context(feats, lens)
    assert ctx.copy_ids is not None and int((ctx.copy_ids >= 0).sum()) > 0
    with torch.no_grad():
        head = model.readout.copy_head
        head.gate.bias.fill_(-60.0)                                      # g = e^-60: the LLM alone
        torch.testing.assert_close(model(input_ids=x, user_context=ctx).logits,
                                   torch.log_softmax(plain(input_ids=x, features=feats, lengths=lens).logits, -1))
        head.gate.bias.fill_(60.0)                                       # g = 1 and a uniform pointer:
        head.query.weight.zero_()                                        # each copyable token's share
        logp = model(input_ids=x, user_context=ctx).logits
        for b in range(3):
            valid = ctx.copy_ids[b, :int(ctx.kv_lengths[b])]
            valid = valid[valid >= 0]
            want = torch.bincount(valid, minlength=50).double() / len(valid)
            torch.testing.assert_close(logp[b, -1].exp().double(), want, rtol=0, atol=1e-6)
        # the candidates' title tokens, and nothing else
        cand = model.encoder.score_next(feats, lens)
        cand[:, 0] = float("-inf")
        top = cand.topk(3, -1).indices
        for b in range(3):
            written = {t for t in range(50) if logp[b, -1, t].exp() > 1e-6}
            assert written == {t for i in top[b].tolist() for t in titles[i] + [EOS]}
        # no history: neither the blocks nor the pointer act
        empty = model(input_ids=x, user_context=ctx.without_history()).logits
        torch.testing.assert_close(empty, torch.log_softmax(model.llm(input_ids=x).logits, -1))


def test_exact_search_and_a_full_beam_agree_with_the_pointer_on():
    with single_thread():
        model, _ = _model(seed=3)
        with torch.no_grad():
            model.readout.copy_head.gate.bias.fill_(1.0)
        rng = random.Random(0)
        entries = [[3 + i, 20 + i % 4] + [30 + i] * (i % 3) for i in range(ITEMS - 1)]
        entries += [[rng.randrange(3, 50) for _ in range(rng.randrange(1, 4))] for _ in range(15)]
        entries = [list(e) for e in dict.fromkeys(map(tuple, entries))]
        trie = Trie(entries, EOS)
        feats, lens = _features()
        ids = torch.tensor([[1, 5, 7], [1, 8, 9], [1, 4, 4]])
        stepper = UserLLMStepper(model)
        logits, past = stepper.prefill(ids, torch.ones_like(ids), feats, lens)
        out = best_first_search(stepper, logits, past, trie, 5, per_round=3)
        wide = constrained_beam_search(stepper, logits, past, trie, num_beams=len(entries), top_k=5)
        assert out.entries == wide.entries
        for b in range(3):
            assert out.scores[b] == pytest.approx(wide.scores[b], abs=1e-4)


def test_a_run_with_the_pointer_trains_saves_its_ids_and_rescores_exactly(tmp_path):
    from safetensors import safe_open
    from test_train import run_train, tiny_args

    from userllm.checkpoint import latest_checkpoint
    from userllm.evaluate import main as evaluate_main

    run = tmp_path / "run"
    run_train(tiny_args(tmp_path / "cache", run, readout_tokens=3, readout_title_tokens=4, readout_pointer=True,
                        strategy="proj", steps=4, llm_pretrain_steps=20))
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["model"].endswith("-readout3x4-pointer")
    keys = set(safe_open(str(latest_checkpoint(run)), "pt").keys())
    assert any(k.endswith("title_ids") for k in keys) and any("copy_head" in k for k in keys)
    evaluate_main([str(run), "--threads", "1", "--decoder", "exact", "--out", str(tmp_path / "exact.json")])
    again = json.loads((tmp_path / "exact.json").read_text())
    assert again["test"]["loss"] == saved["test"]["loss"]
    assert again["test"]["decoder"] == "exact"


def _copy_training_loss(pointer: bool, steps: int = 150) -> tuple[float, float]:
    """(first, last) loss of training only the readout (its copy head, when ``pointer``) of a frozen random
    model to write the title of each row's best candidate."""
    model, titles = _model(pointer=pointer, seed=5)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("readout."))
    feats, lens = _features(lengths=(5, 1, 3, 4, 2, 5), seed=6)
    top = model.encoder.score_next(feats, lens)
    top[:, 0] = float("-inf")
    seqs = [[1, 9] + titles[i] + [EOS] for i in top.argmax(-1).tolist()]   # prompt <s> 9, the title, EOS
    T = max(map(len, seqs))
    x = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
    labels = torch.tensor([[-100, -100] + s[2:] + [-100] * (T - len(s)) for s in seqs])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=x, attention_mask=(x != 0).long(), features=feats, lengths=lens, labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
    return losses[0], losses[-1]


def test_the_pointer_learns_to_write_the_top_candidates_title_where_the_readout_alone_does_not():
    """The same frozen random LLM and cross-attention blocks, the same steps: with the pointer the readout
    learns to write the best candidate's title almost surely; through the blocks alone it does not."""
    with single_thread():
        first, last = _copy_training_loss(pointer=True)
        plain_first, plain_last = _copy_training_loss(pointer=False)
    assert first > 2.0 and last < 0.2, (first, last)
    assert plain_last > 5 * last, (plain_first, plain_last)
