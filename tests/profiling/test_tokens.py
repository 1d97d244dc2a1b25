"""Exact LLM input token counts on a fixed tiny example (word-level tokenizer, counted by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from userllm.profiling.tokens import (TokenCount, count_text_tokens, dataset_tokens, example_tokens,
                                      prefix_tokens, summarize, token_table)


@pytest.fixture(scope="module")
def word_tokenizer():
    """One token per word or punctuation run (``\\w+|[^\\w\\s]+``), unknown words -> <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "History", ":", "Which", "item", "will", "the", "user", "next", "?",
             "Answer", "stars", "|", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


EVENTS = [("Heat (1995)", 4.0, ("Action", "Crime")), ("Up", 3.5, ())]


def test_textprompt_counts_the_rendered_history(word_tokenizer):
    # "History:\n1. Heat (1995) | 4 stars | Action, Crime\n2. Up | 3.5 stars\n"
    # "Which item will the user interact with next?\nAnswer:"
    # History : | 1 . Heat ( 1995 ) | 4 stars | Action , Crime | 2 . Up | 3 . 5 stars
    #   = 2 + 13 + 8 = 23 words/punctuation, question + answer = 11, plus BOS = 35
    c = example_tokens(word_tokenizer, "nextitem", EVENTS, "textprompt")
    assert c == TokenCount("textprompt", 2, 35, 0) and c.total == 35


def test_userllm_cross_attention_adds_no_context_tokens(word_tokenizer):
    c = example_tokens(word_tokenizer, "nextitem", EVENTS, "userllm", integration="xattn", perceiver_latents=16)
    assert (c.text, c.prefix, c.total) == (12, 0, 12)      # BOS + 11 question tokens, whatever the history


def test_userllm_soft_prompt_adds_user_and_task_tokens(word_tokenizer):
    c = example_tokens(word_tokenizer, "nextitem", EVENTS, "userllm", integration="softprompt", task_prompt_len=8)
    assert (c.text, c.prefix, c.total) == (12, 2 + 8, 22)   # one token per event without a Perceiver
    c = example_tokens(word_tokenizer, "nextitem", EVENTS * 50, "userllm", integration="softprompt",
                       perceiver_latents=16, task_prompt_len=8)
    assert (c.history_events, c.prefix, c.total) == (100, 24, 36)
    assert prefix_tokens("softprompt", 0, 16, 8) == 8          # no history: only the task prompt
    with pytest.raises(ValueError):
        prefix_tokens("concat", 3)


def test_counts_skip_automatic_special_tokens(word_tokenizer):
    assert count_text_tokens(word_tokenizer, "Which item ?") == 4
    assert count_text_tokens(word_tokenizer, "Which item ?", bos=False) == 3


def test_dataset_counts_match_the_example_renderer(word_tokenizer):
    from userllm.data.dataset import load_dataset
    from userllm.data.synthetic import SyntheticConfig
    from userllm.text_prompt import PromptRenderer

    ds = load_dataset("synthetic", synthetic=SyntheticConfig(num_users=4, num_items=30, min_events=14,
                                                             max_events=14), use_cache=False)
    rows = token_table(ds, word_tokenizer, "nextitem", [4, 8], limit=3)
    by = {(r["history_length"], r["method"]): r for r in rows}
    assert by[(4, "userllm")]["mean"] == 12 and by[(8, "userllm")]["max"] == 12
    assert by[(4, "textprompt")]["n"] == 3 and by[(8, "textprompt")]["mean"] > by[(4, "textprompt")]["mean"]
    # the dataset path and the per-example path agree on one window
    start, end = int(ds.offsets[0]), int(ds.offsets[0]) + 5
    r = PromptRenderer(ds, None)
    events = [r.event(i) for i in range(start, end)]
    [c] = dataset_tokens(ds, word_tokenizer, "nextitem", [start], [end], "textprompt")
    assert c == example_tokens(word_tokenizer, "nextitem", events, "textprompt")
    s = summarize([c, c])
    assert s["n"] == 2 and s["mean"] == c.total and s["prefix_mean"] == 0
    assert np.isclose(s["text_mean"], c.text)
