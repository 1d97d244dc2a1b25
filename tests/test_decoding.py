"""Trie-constrained beam search: outputs are valid entries, ordered, and exact when the beam is wide."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from userllm.decoding import (HFStepper, Trie, constrained_beam_search, greedy_decode, left_pad, recall_from_beams,
                              score_entries)


class FakeLM:
    """A deterministic 'model': next-token logits depend on the whole prefix (sum of token embeddings).

    ``past`` is the token history [R, t]; the step reorders it by ``beam_idx`` like a real KV cache.
    """

    def __init__(self, vocab: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(vocab, 16, generator=g)
        self.out = torch.randn(16, vocab, generator=g) * 2
        self.vocab = vocab

    def logits(self, hist: torch.Tensor) -> torch.Tensor:
        h = self.emb[hist].sum(1) + 0.3 * hist.shape[1]
        return torch.tanh(h) @ self.out

    def prefill(self, prompts: torch.Tensor):
        return self.logits(prompts), prompts

    def __call__(self, input_ids, past, beam_idx):
        hist = torch.cat([past.index_select(0, beam_idx), input_ids], dim=1)
        return self.logits(hist), hist

    def score(self, prompt: torch.Tensor, seq: list[int]) -> float:
        hist, total = prompt[None], 0.0
        for t in seq:
            total += F.log_softmax(self.logits(hist), -1)[0, t].item()
            hist = torch.cat([hist, torch.tensor([[t]])], 1)
        return total


def random_catalogue(rng: random.Random, vocab: int, eos: int, n: int) -> list[list[int]]:
    seqs: set[tuple[int, ...]] = set()
    tokens = [t for t in range(vocab) if t != eos]
    while len(seqs) < n:
        # Shared prefixes on purpose: draw from a small alphabet, lengths 1..5.
        seqs.add(tuple(rng.choice(tokens[:6]) for _ in range(rng.randint(1, 5))))
    return [list(s) for s in sorted(seqs)]


def random_case(seed: int, max_entries: int, max_k: int, lm_class=FakeLM):
    """(entries, trie, lm, prompts int64 [B, P], K, eos): a random catalogue over vocab 12 (EOS 2), a fake LM,
    1-4 random prompts and a top-K, all drawn from ``seed``."""
    rng = random.Random(seed)
    vocab, eos = 12, 2
    entries = random_catalogue(rng, vocab, eos, rng.randint(1, max_entries))
    lm = lm_class(vocab, seed)
    B = rng.randint(1, 4)
    prompts = torch.randint(0, vocab, (B, rng.randint(1, 4)), generator=torch.Generator().manual_seed(seed))
    return entries, Trie(entries, eos), lm, prompts, rng.randint(1, max_k), eos


@pytest.mark.parametrize("seed", range(12))
def test_random_tries_outputs_valid_ordered_and_exact(seed):
    entries, trie, lm, prompts, K, eos = random_case(seed, 20, 6)
    B, n_entries = len(prompts), len(entries)
    logits, past = lm.prefill(prompts)
    out = constrained_beam_search(lm, logits, past, trie, num_beams=K)
    for b in range(B):
        got, scores = out.entries[b], out.scores[b]
        assert len(got) == len(set(got)) <= K
        assert all(0 <= e < n_entries for e in got)  # every output is a catalogue entry
        assert scores == sorted(scores, reverse=True)
        for e, s in zip(got, scores):  # reported score = the entry's true log-likelihood (+EOS)
            assert s == pytest.approx(lm.score(prompts[b], entries[e] + [eos]), abs=1e-4)
    # A beam wide enough to hold every prefix is exhaustive: it returns the brute-force top-k.
    wide = constrained_beam_search(lm, logits, past, trie, num_beams=n_entries, top_k=min(K, n_entries))
    for b in range(B):
        brute = sorted(range(n_entries), key=lambda e: -lm.score(prompts[b], entries[e] + [eos]))
        assert wide.entries[b] == brute[:min(K, n_entries)]
        assert len(wide.entries[b]) == min(K, n_entries)


def test_trie_rejects_duplicates_and_eos():
    with pytest.raises(ValueError):
        Trie([[3, 4], [3, 4]], eos_id=2)
    with pytest.raises(ValueError):
        Trie([[3, 2]], eos_id=2)
    t = Trie([[3, 4], [3], [5]], eos_id=2)
    assert sorted(t.allowed(0)) == [3, 5]
    assert sorted(t.allowed(t.walk([3]))) == [2, 4]  # "3" is complete and a prefix of "3 4"
    assert t.value[t.walk([3, 2])] == 1 and t.walk([4]) is None


def tiny_llama(vocab=40, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_hf_stepper_matches_brute_force_and_is_padding_invariant():
    model = tiny_llama()
    eos = 2
    rng = random.Random(0)
    entries = random_catalogue(rng, 40, eos, 9)
    trie = Trie(entries, eos)
    prompts = [[1, 5, 7, 9, 11, 3], [1, 8], [1, 4, 4, 30]]
    ids, mask = left_pad(prompts, pad_id=0)
    stepper = HFStepper(model)
    logits, past = stepper.prefill(ids, mask)
    out = constrained_beam_search(stepper, logits, past, trie, num_beams=len(entries), top_k=5)
    for b, p in enumerate(prompts):
        brute = score_entries(model, p, entries, eos)
        order = torch.argsort(brute, descending=True)[:5].tolist()
        assert out.entries[b] == order
        assert out.scores[b] == pytest.approx(brute[order].tolist(), abs=1e-4)
        # the same prompt alone (no padding) decodes identically
        i1, m1 = left_pad([p], 0)
        l1, s1 = stepper.prefill(i1, m1)
        assert constrained_beam_search(stepper, l1, s1, trie, num_beams=len(entries), top_k=5).entries[0] == order


def test_greedy_decode_matches_argmax_rollout():
    model = tiny_llama(seed=1)
    prompts = [[1, 5, 7], [1, 9, 9, 9, 4]]
    ids, mask = left_pad(prompts, 0)
    stepper = HFStepper(model)
    logits, past = stepper.prefill(ids, mask)
    out = greedy_decode(stepper, logits, past, eos_id=2, max_new_tokens=6)
    for b, p in enumerate(prompts):
        seq = list(p)
        expect = []
        for _ in range(6):
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == 2:
                break
            expect.append(nxt)
            seq.append(nxt)
        assert out[b] == expect


def test_recall_from_beams():
    entries = [[3, 1, 2], [0, 5], [], [9, 8, 7, 6, 5, 4]]
    labels = [3, 5, 1, 4]
    r = recall_from_beams(entries, labels, ks=(1, 5))
    assert r == {"recall@1": 0.25, "recall@5": 0.5}


def test_decoding_uses_no_deprecated_transformers_api():
    """transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40);
    the steppers and UserLLM must use whichever name the installed version's models take."""
    import logging
    import warnings

    from userllm.decoding import UserLLMStepper
    from userllm.integration import UserLLM, UserLLMConfig
    from userllm.integration.testing import ToyEncoder, tiny_llm, toy_features

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.Logger.warning_once.cache_clear()      # transformers logs each deprecation once per process
    handler = Collect(level=logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            llm = tiny_llm("llama")
            ids, mask = left_pad([[5, 6, 7], [8, 9]], pad_id=0)
            stepper = HFStepper(llm)
            logits, state = stepper.prefill(ids, mask)
            stepper(logits.argmax(-1, keepdim=True), state, torch.tensor([1, 0]))
            feats, lens = toy_features([3, 1])
            for integration in ("xattn", "softprompt"):
                model = UserLLM(tiny_llm("llama"), ToyEncoder([20, 5]), UserLLMConfig(integration=integration)).eval()
                ustep = UserLLMStepper(model)
                logits, state = ustep.prefill(ids, mask, feats, lens)
                ustep(logits.argmax(-1, keepdim=True), state, torch.tensor([1, 0]))
                model.generate(ids, attention_mask=mask, features=feats, lengths=lens, max_new_tokens=2,
                               do_sample=False, pad_token_id=0)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    messages = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    messages += records
    assert not [m for m in messages if "deprecat" in m.lower()], messages
