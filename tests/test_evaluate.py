"""Evaluation: constrained decoding on User-LLM (cached user context follows the beams), the three
tasks, and python -m userllm.evaluate re-scoring a run's checkpoint exactly."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_train import pretrained_llm, run_train, tiny_args  # noqa: F401 (pretrained_llm: a fixture)

from userllm.decoding import Trie, UserLLMStepper, constrained_beam_search, left_pad
from userllm.evaluate import main as evaluate_main
from userllm.cli import run_cli

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def brute_force(model, prompt, entries, eos, features, lengths):
    """log p(entry + EOS | prompt, user) for every entry, by one uncached forward per entry."""
    scores = []
    for e in entries:
        seq = torch.tensor([prompt + e + [eos]])
        logits = model(input_ids=seq, features=features, lengths=lengths).logits
        logp = F.log_softmax(logits[0].float(), -1)
        tgt = seq[0, len(prompt):]
        scores.append(float(logp[len(prompt) - 1:-1].gather(1, tgt[:, None]).sum()))
    return torch.tensor(scores)


@pytest.mark.parametrize("integration, latents", [("xattn", 0), ("softprompt", 0), ("xattn", 2)])
def test_user_llm_beams_are_valid_and_exact(integration, latents):
    from userllm.integration import UserLLM, UserLLMConfig
    from userllm.integration.testing import ToyEncoder, tiny_llm

    torch.manual_seed(0)
    model = UserLLM(tiny_llm("llama", vocab_size=40), ToyEncoder([12, 6], 16),
                    UserLLMConfig(integration=integration, perceiver_latents=latents, task_prompt_len=2)).eval()
    for block in model.xattn:  # open the tanh gates so the user context really changes the logits
        for p in block.parameters():
            if p.dim() == 0 or p.numel() == 1:
                p.data.fill_(1.0)
    rng = random.Random(0)
    entries = sorted({tuple(rng.choice([3, 4, 5, 6]) for _ in range(rng.randint(1, 4))) for _ in range(30)})
    entries = [list(e) for e in entries][:10]
    trie = Trie(entries, eos_id=2)
    prompts = [[1, 7, 8, 9], [1, 10], [1, 11, 12]]
    feats = [torch.tensor([[1, 2, 3], [4, 5, -1], [6, -1, -1]]), torch.tensor([[1, 1, 2], [3, 4, -1], [5, -1, -1]])]
    lengths = torch.tensor([3, 2, 1])
    ids, mask = left_pad(prompts, 0)
    stepper = UserLLMStepper(model)
    logits, past = stepper.prefill(ids, mask, feats, lengths)
    out = constrained_beam_search(stepper, logits, past, trie, num_beams=len(entries), top_k=4)
    for b, p in enumerate(prompts):
        brute = brute_force(model, p, entries, 2, [f[b:b + 1, :int(lengths[b])] for f in feats], lengths[b:b + 1])
        order = torch.argsort(brute, descending=True)[:4].tolist()
        assert out.entries[b] == order
        assert out.scores[b] == pytest.approx(brute[order].tolist(), abs=1e-4)
    # the users matter: another user's context gives other scores for the same prompt
    other = brute_force(model, prompts[0], entries, 2, [f[1:2, :2] for f in feats], lengths[1:2])
    mine = brute_force(model, prompts[0], entries, 2, [f[0:1] for f in feats], lengths[0:1])
    assert not torch.allclose(other, mine)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("over", [
    {},
    {"baseline": "textprompt", "strategy": "lora"},
    {"integration": "softprompt", "perceiver_latents": 2, "text_events": 2},
    {"strategy": "enc", "llm": "pretrained"},  # frozen --llm: its weights are not in the checkpoint
])
def test_evaluate_cli_rescores_the_checkpoint_exactly(tmp_path, cache, capsys, request, over):
    out = tmp_path / "run"
    if over.get("llm") == "pretrained":
        over = {**over, "llm": request.getfixturevalue("pretrained_llm")}
    run_train(tiny_args(cache, out, steps=6, **over))
    trained = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert run_cli(evaluate_main, [str(out)]) == 0
    printed = capsys.readouterr().out
    again = json.loads((out / "eval.json").read_text())
    for k in ("recall@1", "recall@5", "count"):
        assert again["test"][k] == trained["test"][k]
    assert again["test"]["loss"] == pytest.approx(trained["test"]["loss"], rel=1e-5)
    assert again["test"]["samples"] == trained["test"]["samples"]
    assert "recall@1" in printed and trained["model"] in printed
    if not over:  # the contrastive decoding of a finished run (issue 14), and its refusal for TextPrompt
        assert run_cli(evaluate_main, [str(out), "--prior-weight", "0.5"]) == 0
        assert "0.5 log p(title | no history)" in capsys.readouterr().out
        assert json.loads((out / "eval.json").read_text())["test"]["prior_weight"] == 0.5
        before = (out / "eval.json").read_text()
        exact = out / "eval_exact.json"       # README "Session 9"; --out keeps eval.json as it was
        assert run_cli(evaluate_main, [str(out), "--decoder", "exact", "--out", str(exact)]) == 0
        assert "by best-first search" in capsys.readouterr().out
        assert json.loads(exact.read_text())["test"]["inexact"] == 0
        assert (out / "eval.json").read_text() == before
        assert run_cli(evaluate_main, [str(out), "--out", str(out / "missing" / "e.json")]) == 2
        assert "--out" in capsys.readouterr().err
        assert run_cli(evaluate_main, [str(out), "--decoder", "exact", "--prior-weight", "0.5"]) == 2
        assert "--decoder exact" in capsys.readouterr().err
    elif over.get("baseline") == "textprompt":
        assert run_cli(evaluate_main, [str(out), "--prior-weight", "0.5"]) == 2
        assert "--prior-weight" in capsys.readouterr().err


def test_favgenre_decodes_category_names(tmp_path, cache):
    out = tmp_path / "fav"
    results = run_train(tiny_args(cache, out, task="favgenre", steps=6))
    names = set(json.loads((out / "metrics.json").read_text())["test"]["samples"][0]["top3"])
    from userllm.config import parse_config
    from userllm.factory import load_data

    ds = load_data(parse_config(tiny_args(cache, out)))
    genres = {c for cs in ds.events.items.categories for c in cs}
    assert names and names <= genres
    assert 0.0 <= results["test"]["recall@1"] <= results["test"]["recall@5"] <= 1.0


def test_reviewg_reports_rouge(tmp_path, cache):
    results = run_train(tiny_args(cache, tmp_path / "rev", task="reviewg", steps=6, max_target_tokens=6))
    test = results["test"]
    assert {"rouge1", "rouge2", "rougeL", "rougeLsum"} <= set(test)
    assert 0.0 <= test["rougeLsum"] <= 1.0 and test["count"] == 4
    assert all(isinstance(s["generated"], str) for s in test["samples"])


def test_evaluate_cli_errors():
    proc = subprocess.run([sys.executable, "-m", "userllm.evaluate", "/nonexistent/run"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a run directory" in proc.stderr and "Traceback" not in proc.stderr
