"""Per-user trie-constrained sampling: valid outputs, the exact locally renormalised distribution, greedy."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from userllm.decoding import Trie
from userllm.explore.sampling import constrained_sample, nucleus, user_trie

EOS = 2


class FakeLM:
    """Next-token logits depend on the whole prefix; ``past`` is the token history [R, t]."""

    def __init__(self, vocab: int = 9, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(vocab, 8, generator=g)
        self.out = torch.randn(8, vocab, generator=g) * 1.5

    def logits(self, hist: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.emb[hist].sum(1) + 0.2 * hist.shape[1]) @ self.out

    def __call__(self, input_ids, past, beam_idx):
        hist = torch.cat([past.index_select(0, beam_idx), input_ids], dim=1)
        return self.logits(hist), hist


LABELS = [[3, 4], [3, 5, 6], [4], [5, 3], [6, 6, 7]]


def local_probability(lm: FakeLM, prompt: list[int], trie: Trie, seq: list[int]) -> float:
    """P(seq) under token-by-token sampling restricted to the trie's children (renormalised at each step)."""
    hist, node, p = torch.tensor([prompt]), 0, 1.0
    for t in seq + [EOS]:
        kids = list(trie.children[node])
        probs = F.softmax(lm.logits(hist)[0, kids], -1)
        p *= float(probs[kids.index(t)])
        node = trie.children[node][t]
        hist = torch.cat([hist, torch.tensor([[t]])], 1)
    return p


def run(lm, prompts, allowed, n, temperature=1.0, top_p=1.0, seed=0):
    past = torch.tensor(prompts)
    tries = [user_trie(LABELS, a, EOS) for a in allowed]
    out = constrained_sample(lm, lm.logits(past), past, tries, n, temperature, top_p,
                             torch.Generator().manual_seed(seed))
    return [[a[e] for e in row] for a, row in zip(allowed, out.entries)], out


def test_samples_are_allowed_labels_of_each_row():
    lm = FakeLM()
    allowed = [[0, 1, 4], [2, 3], [1]]
    picks, out = run(lm, [[1, 7], [1, 8], [1, 3]], allowed, n=50)
    for a, row in zip(allowed, picks):
        assert len(row) == 50 and set(row) <= set(a)
    assert picks[2] == [1] * 50
    assert out.fed_tokens > 0 and out.steps <= max(len(x) for x in LABELS) + 1


def test_sampling_distribution_is_the_locally_renormalised_one():
    lm = FakeLM(seed=3)
    allowed = [0, 1, 3, 4]
    n = 4000
    picks, _ = run(lm, [[1, 6]], [allowed], n=n, seed=1)
    trie = user_trie(LABELS, allowed, EOS)
    exact = np.array([local_probability(lm, [1, 6], trie, LABELS[c]) for c in allowed])
    assert abs(exact.sum() - 1) < 1e-5
    freq = np.array([picks[0].count(c) / n for c in allowed])
    assert np.abs(freq - exact).sum() / 2 < 0.04            # total variation; its sampling sd is ~0.01


def test_temperature_zero_is_token_greedy_and_top_p_keeps_the_best_token():
    lm = FakeLM(seed=5)
    allowed = [0, 1, 2, 3, 4]
    picks, _ = run(lm, [[1, 4]], [allowed], n=3, temperature=0.0)
    trie = user_trie(LABELS, allowed, EOS)
    hist, node, seq = torch.tensor([[1, 4]]), 0, []
    while True:                                              # the greedy walk by hand
        kids = list(trie.children[node])
        t = kids[int(lm.logits(hist)[0, kids].argmax())]
        if t == EOS:
            break
        seq.append(t)
        node = trie.children[node][t]
        hist = torch.cat([hist, torch.tensor([[t]])], 1)
    assert picks[0] == [LABELS.index(seq)] * 3
    tiny_p, _ = run(lm, [[1, 4]], [allowed], n=20, top_p=1e-6, seed=2)
    assert tiny_p[0] == picks[0][:1] * 20                   # a vanishing nucleus is greedy too
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    kept = nucleus(logits, 0.8)                              # p = .64 .24 .09 .03: the first two cover .8
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    assert torch.equal(nucleus(logits, 1.0), logits)
