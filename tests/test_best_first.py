"""Exact constrained decoding (best-first search): the brute-force top K, in order, where beams are not."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from userllm.best_first import best_first_search
from userllm.decoding import HFStepper, Trie, UserLLMStepper, constrained_beam_search, left_pad, score_entries
from userllm.integration import UserLLM, UserLLMConfig
from userllm.integration.testing import ToyEncoder, open_gates, single_thread, tiny_llm, toy_features

from test_decoding import FakeLM, random_case, random_catalogue, tiny_llama


class FakePrefixLM(FakeLM):
    """FakeLM with the stepper's ``prefix_logits``: the prompts are its ``past`` (token history [B, P])."""

    def prefix_logits(self, past, rows, input_ids, lengths):
        out = []
        for r, ids, n in zip(rows.tolist(), input_ids, lengths.tolist()):
            out.append(self.logits(torch.cat([past[r], ids[:n]])[None])[0])
        return torch.stack(out)


@pytest.mark.parametrize("seed", range(16))
def test_random_tries_give_the_brute_force_top_k(seed):
    entries, trie, lm, prompts, K, eos = random_case(seed, 25, 7, FakePrefixLM)
    B, n_entries = len(prompts), len(entries)
    logits, past = lm.prefill(prompts)
    for per_round in (1, 3, 8):
        out = best_first_search(lm, logits, past, trie, K, per_round=per_round)
        assert out.inexact == 0
        for b in range(B):
            brute = [lm.score(prompts[b], e + [eos]) for e in entries]
            order = sorted(range(n_entries), key=lambda e: -brute[e])[:K]
            assert out.scores[b] == pytest.approx([brute[e] for e in order], abs=1e-4)
            assert out.entries[b] == order
            assert len(out.entries[b]) == len(set(out.entries[b])) == min(K, n_entries)


def test_finds_what_a_narrow_beam_loses():
    """The failure the module docstring describes: a likely first token whose continuations are all
    unlikely holds the beam, while the best entry starts with a less likely token."""
    eos, V = 2, 8
    entries = [[3, 4], [3, 5], [3, 6], [7, 4]]            # "3 ..." is likely at first, each continuation is not

    class Peaked:
        def prefix_logits(self, past, rows, input_ids, lengths):
            out = torch.full((len(rows), V), -30.0)
            for i, (ids, n) in enumerate(zip(input_ids, lengths.tolist())):
                prefix = ids[:n].tolist()
                if prefix == [3]:
                    out[i, [4, 5, 6]] = 0.0                   # spread over three titles
                    out[i, 0] = 3.0                           # most mass outside the catalogue
                else:                                         # "7": the copy is certain
                    out[i, 4 if prefix == [7] else eos] = 30.0
            return out

    first = torch.full((1, V), -30.0)
    first[0, 3], first[0, 7] = 1.0, 0.0
    out = best_first_search(Peaked(), first, None, Trie(entries, eos), top_k=1)
    assert out.entries == [[3]]                               # "7 4", whose copy is certain


def test_max_expansions_stops_and_counts_inexact():
    rng = random.Random(3)
    entries = random_catalogue(rng, 12, 2, 25)
    lm = FakePrefixLM(12, 3)
    prompts = torch.randint(0, 12, (3, 2), generator=torch.Generator().manual_seed(0))
    logits, past = lm.prefill(prompts)
    out = best_first_search(lm, logits, past, Trie(entries, 2), 10, per_round=1, max_expansions=2)
    assert out.inexact == 3 and all(e <= 3 for e in out.expansions)
    assert all(len(set(e)) == len(e) <= 10 for e in out.entries)
    with pytest.raises(ValueError):
        best_first_search(lm, logits, past, Trie(entries, 2), 0)


def test_hf_stepper_matches_brute_force_with_padded_prompts():
    model = tiny_llama()
    eos = 2
    entries = random_catalogue(random.Random(0), 40, eos, 30)
    trie = Trie(entries, eos)
    prompts = [[1, 5, 7, 9, 11, 3], [1, 8], [1, 4, 4, 30]]
    ids, mask = left_pad(prompts, pad_id=0)
    stepper = HFStepper(model)
    logits, past = stepper.prefill(ids, mask)
    out = best_first_search(stepper, logits, past, trie, 7, per_round=4)
    again = best_first_search(stepper, logits, past, trie, 7, per_round=1)   # the prefill state is not consumed
    for b, p in enumerate(prompts):
        brute = score_entries(model, p, entries, eos)
        order = torch.argsort(brute, descending=True)[:7].tolist()
        assert out.entries[b] == again.entries[b] == order
        assert out.scores[b] == pytest.approx(brute[order].tolist(), abs=1e-4)


@pytest.mark.parametrize("family,integration", [("llama", "xattn"), ("gpt2", "xattn"), ("llama", "softprompt")])
def test_user_llm_matches_teacher_forced_scores_and_a_beam_as_wide_as_the_catalogue(family, integration):
    with single_thread():
        torch.manual_seed(0)
        model = UserLLM(tiny_llm(family, layers=2), ToyEncoder([20, 5]), UserLLMConfig(integration=integration)).eval()
        if integration == "xattn":
            open_gates(model, 1.0)
        eos = 2
        entries = random_catalogue(random.Random(1), 40, eos, 40)
        trie = Trie(entries, eos)
        feats, lens = toy_features([6, 3, 0])
        ids, mask = left_pad([[1, 5, 7], [1, 8], [1, 4, 4, 30]], pad_id=0)
        stepper = UserLLMStepper(model)
        logits, past = stepper.prefill(ids, mask, feats, lens)
        out = best_first_search(stepper, logits, past, trie, 5, per_round=3)
        wide = constrained_beam_search(stepper, logits, past, trie, num_beams=len(entries), top_k=5)
        assert out.entries == wide.entries                    # a beam as wide as the catalogue is exhaustive
        for b in range(3):
            assert out.scores[b] == pytest.approx(wide.scores[b], abs=1e-4)
        with torch.no_grad():                                 # and the scores are the teacher-forced ones
            ctx = model.prepare_user_context(feats, lens)
            p = ids[0, mask[0].bool()].tolist()
            seqs = [p + entries[e] + [eos] for e in out.entries[0]]
            T = max(map(len, seqs))
            x = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
            m = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
            lp = F.log_softmax(model(input_ids=x, attention_mask=m,
                                     user_context=ctx.index_select(torch.zeros(len(seqs), dtype=torch.long))
                                     ).logits.float(), -1)
            tf = [float(lp[i, len(p) - 1:len(s) - 1].gather(1, torch.tensor(s[len(p):])[:, None]).sum())
                  for i, s in enumerate(seqs)]
        assert out.scores[0] == pytest.approx(tf, abs=1e-4)
