"""Readout tokens (--readout-tokens): the encoder's top-K next items as extra user tokens, the caption
stage's top-1 swap, and the title-token mode (--readout-title-tokens)."""

from __future__ import annotations

import json

import pytest
import torch

from userllm.integration.readout import NextItemReadout, append_tokens, title_vectors


def test_append_tokens_keeps_the_right_padding():
    states = torch.arange(2 * 3 * 1, dtype=torch.float32).view(2, 3, 1) + 1
    lengths = torch.tensor([3, 1])
    states[1, 1:] = 0
    tokens = torch.full((2, 2, 1), -1.0)
    out, n = append_tokens(states, lengths, tokens)
    assert n.tolist() == [5, 3]
    assert out[0, :, 0].tolist() == [1, 2, 3, -1, -1]
    assert out[1, :, 0].tolist() == [4, -1, -1, 0, 0]


def test_readout_takes_the_k_best_items_and_never_unk():
    r = NextItemReadout(num_items=6, d_model=4, k=2)
    vec = torch.eye(6, 4)
    vec[5] = torch.tensor([0.0, 0.0, 0.0, 5.0])
    r.set_title_vectors(vec)
    with torch.no_grad():
        r.rank_embedding.zero_()
    scores = torch.tensor([[9.0, 0.0, 1.0, 0.0, 0.0, 2.0]])     # UNK scores highest: it must be skipped
    tokens = r(scores)
    assert tokens.shape == (1, 2, 4)
    assert torch.allclose(tokens[0, 0], vec[5]) and torch.allclose(tokens[0, 1], vec[2])


class _LM(torch.nn.Module):
    """Just the input embeddings [n, d] that title_vectors reads."""

    def __init__(self, n: int, d: int):
        super().__init__()
        self.e = torch.nn.Embedding(n, d)

    def get_input_embeddings(self):
        return self.e


def test_title_vectors_are_mean_input_embeddings():
    lm = _LM(5, 2)
    v = title_vectors(lm, [[], [1, 3], [4]])
    assert torch.equal(v[0], torch.zeros(2))
    assert torch.allclose(v[1], lm.e.weight[[1, 3]].mean(0)) and torch.allclose(v[2], lm.e.weight[4])


def test_a_run_with_readout_tokens_trains_and_rescores_exactly(tmp_path):
    from test_train import run_train, tiny_args

    from userllm.evaluate import main as evaluate_main

    run = tmp_path / "run"
    run_train(tiny_args(tmp_path / "cache", run, readout_tokens=3, strategy="proj", steps=4))
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["model"].endswith("-readout3")
    evaluate_main([str(run), "--threads", "1"])
    again = json.loads((run / "eval.json").read_text())
    assert again["test"]["loss"] == saved["test"]["loss"]
    assert again["test"]["context_gain"] == saved["test"]["context_gain"]


def _readout(V=40, d=8, k=4, seed=0):
    r = NextItemReadout(V, d, k)
    g = torch.Generator().manual_seed(seed)
    r.set_title_vectors(torch.randn(V, d, generator=g))
    with torch.no_grad():                       # a score direction that shows the candidates' log-probs
        r.score_direction.copy_(torch.randn(d, generator=g))
    return r


def _expected(r: NextItemReadout, scores: torch.Tensor) -> torch.Tensor:
    """The readout's tokens written out in float64, row by row."""
    logp = torch.log_softmax(scores.double(), -1)
    logp[:, 0] = float("-inf")
    top, idx = logp.topk(r.k, -1)
    W, b = r.adapter.weight.double(), r.adapter.bias.double()
    return (r.title_vectors.double()[idx] @ W.T + b + r.rank_embedding.double()
            + top[..., None] * r.score_direction.double())


def test_candidates_replaced_take_the_best_places_with_the_encoders_scores():
    r = _readout()
    scores = torch.randn(6, 40, generator=torch.Generator().manual_seed(2)) * 3
    items = torch.tensor([[7, 9], [11, 13], [17, 19], [21, 23], [25, 27], [29, 31]])
    logp = torch.log_softmax(scores.double(), -1)
    logp[:, 0] = float("-inf")
    top, idx = logp.topk(r.k, -1)
    idx[:, :2] = items
    W, b = r.adapter.weight.double(), r.adapter.bias.double()
    want = (r.title_vectors.double()[idx] @ W.T + b + r.rank_embedding.double()
            + top[..., None] * r.score_direction.double())
    with r.candidates_replaced(items):
        out = r(scores)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(r(scores).double(), _expected(r, scores), rtol=0, atol=1e-5)  # undone on exit
    with pytest.raises(ValueError, match="for 6 rows, scores for 3"), r.candidates_replaced(items):
        r(scores[:3])
    with pytest.raises(ValueError, match="J <= 4"):
        r.candidates_replaced(torch.ones(6, 5, dtype=torch.int64)).__enter__()


def test_title_token_mode_pairs_each_title_token_with_the_one_before_it():
    llm = _LM(20, 8)
    ids = [[], [3, 4, 5], [6], [7, 8, 9, 10, 11]] + [[12, 13]] * 6          # V = 10; item 2: one token
    vec = title_vectors(llm, ids, title_tokens=3)
    E = llm.e.weight.detach()
    assert vec.shape == (10, 3, 8)
    torch.testing.assert_close(vec[3], E[[7, 8, 9]])                           # cut to P tokens
    torch.testing.assert_close(vec[2, 0], E[6])
    assert bool((vec[2, 1:] == 0).all())
    torch.testing.assert_close(title_vectors(llm, ids)[1], E[[3, 4, 5]].mean(0))
    r = NextItemReadout(10, 8, 2, title_tokens=3)
    r.set_title_vectors(vec)
    scores = torch.full((1, 10), -5.0)
    scores[0, 3], scores[0, 2] = 4.0, 3.0                                      # candidates: 3, then 2
    out = r(scores)
    assert out.shape == (1, 6, 8) and r.tokens_per_request == 6
    logp = torch.log_softmax(scores, -1)[0]
    with torch.no_grad():
        for k, item in enumerate((3, 2)):
            for j in range(3):
                prev = r.start if j == 0 else vec[item, j - 1]
                want = (r.adapter(vec[item, j]) + r.prev_adapter(prev) + r.position_embedding[j]
                        + r.rank_embedding[k] + logp[item] * r.score_direction)
                torch.testing.assert_close(out[0, 3 * k + j], want)
    with pytest.raises(ValueError, match=r"must be \(10, 3, 8\)"):
        r.set_title_vectors(torch.zeros(10, 8))


@pytest.mark.parametrize("title_tokens", [0, 3])
def test_soft_prompt_prefix_counts_every_readout_token(title_tokens):
    """num_prefix_tokens (what the factory takes off the LLM's context) = the soft prompt's real length:
    the events, K x max(1, P) readout tokens and the task prompt."""
    from userllm.data.dataset import FeatureSpec
    from userllm.encoders import AutoregressiveEncoder, EncoderConfig
    from userllm.integration import UserLLM, UserLLMConfig
    from userllm.integration.testing import tiny_llm

    torch.manual_seed(0)
    specs = [FeatureSpec("item", 12, False)]
    enc = AutoregressiveEncoder(EncoderConfig(specs, d_model=16, n_layers=1, n_heads=2, max_len=8)).eval()
    model = UserLLM(tiny_llm("llama", vocab_size=50, hidden=32), enc,
                    UserLLMConfig(integration="softprompt", task_prompt_len=2, readout_tokens=4,
                                  readout_title_tokens=title_tokens)).eval()
    feats = [torch.randint(1, 12, (2, 5))]
    states, _ = model.encode_users(feats, torch.tensor([5, 5]))
    assert states.shape[1] == 5 + 4 * max(1, title_tokens)
    assert model.num_prefix_tokens(5) == states.shape[1] + 2
