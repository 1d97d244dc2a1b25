"""Readout tokens (--readout-tokens): the encoder's top-K next items as extra user tokens."""

from __future__ import annotations

import json

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


def test_title_vectors_are_mean_input_embeddings():
    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.e = torch.nn.Embedding(5, 2)

        def get_input_embeddings(self):
            return self.e

    lm = LM()
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
