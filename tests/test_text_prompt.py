"""History/prompt rendering, the catalogue, and the token batches built from event batches."""

from __future__ import annotations

import numpy as np
import pytest

from userllm.data.dataset import load_dataset
from userllm.data.examples import collate, make_examples
from userllm.data.synthetic import SyntheticConfig
from userllm.llm import cached_tokenizer
from userllm.llm_data import IGNORE, Catalogue, LLMBatcher
from userllm.text_prompt import (PromptRenderer, build_prompt, corpus_texts, format_rating, render_event,
                                 render_history, target_text)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    cfg = SyntheticConfig(num_users=12, num_items=30, min_events=8, max_events=12, seed=1)
    return load_dataset("synthetic", cache_dir=tmp_path_factory.mktemp("cache"), synthetic=cfg)


@pytest.fixture(scope="module")
def tok(ds, tmp_path_factory):
    return cached_tokenizer(corpus_texts(ds), tmp_path_factory.mktemp("tok"), 500)


def test_rendering():
    assert format_rating(4.0) == "4" and format_rating(3.5) == "3.5" and format_rating(float("nan")) is None
    assert render_event("Heat (1995)", 4.0, ("Action", "Crime")) == "Heat (1995) | 4 stars | Action, Crime"
    assert render_event("X", None, ()) == "X"
    assert render_history([("A", 5.0, ()), ("B", float("nan"), ("Drama",))]) == "1. A | 5 stars\n2. B | Drama"
    p = build_prompt("nextitem")
    assert p == "Which item will the user interact with next?\nAnswer:"
    p = build_prompt("favgenre", "1. A", category_word="category")
    assert p.startswith("History:\n1. A\n") and "favorite category?" in p
    assert "review of Heat" in build_prompt("reviewg", item_title="Heat")
    with pytest.raises(ValueError):
        build_prompt("bogus")
    assert target_text(" Heat ") == " Heat"


@pytest.mark.parametrize("text_events", [0, 3, None])
def test_renderer_history_is_the_window_tail(ds, text_events):
    ex = make_examples(ds, "nextitem", 5, "test")
    r = PromptRenderer(ds, text_events)
    start, target = int(ex.start[0]), int(ex.target[0])
    prompt = r.prompt("nextitem", start, target)
    if text_events == 0:
        assert "History:" not in prompt
        return
    lines = [ln for ln in prompt.splitlines() if ln[:1].isdigit()]
    n = (target - start) if text_events is None else min(text_events, target - start)
    assert len(lines) == n
    last_title = ds.events.items.titles[ds.events.item[target - 1]]
    assert lines[-1].startswith(f"{n}. {last_title}")  # the event right before the target, last
    target_title = ds.events.items.titles[ds.events.item[target]]
    assert target_title not in prompt or target_title in (ds.events.items.titles[ds.events.item[i]]
                                                          for i in range(start, target))


def test_catalogue_dedups_titles_and_maps_labels(ds):
    cat = Catalogue.for_task(ds, "nextitem")
    assert len(set(cat.entries)) == len(cat.entries)
    assert cat.label_to_entry[0] == -1
    titles = ds.item_titles(np.arange(1, ds.num_items))
    for label in range(1, ds.num_items):
        assert cat.entries[cat.label_to_entry[label]] == titles[label - 1]
    genres = Catalogue.for_task(ds, "favgenre")
    assert genres.entries == ds.category_names(np.arange(1, len(ds.vocabs["category"])))
    assert Catalogue.for_task(ds, "reviewg") is None


@pytest.mark.parametrize("task", ["nextitem", "favgenre", "reviewg"])
def test_train_batch_labels_only_the_target(ds, tok, task):
    ex = make_examples(ds, task, 6, "train")
    events = collate(ds, ex, np.arange(5))
    b = LLMBatcher(ds, tok, task, text_events=2, max_target_tokens=8)
    lb = b.train_batch(events)
    refs = b.references(events)
    assert lb.events is events and lb.input_ids.shape == lb.labels.shape == lb.attention_mask.shape
    for i in range(5):
        ids = lb.input_ids[i][lb.attention_mask[i].bool()].tolist()
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        tgt = lb.labels[i][lb.labels[i] != IGNORE].tolist()
        assert tgt[-1] == tok.eos_token_id and ids[-len(tgt):] == tgt
        if task == "reviewg":
            assert len(tgt) <= 9
        else:
            assert tok.decode(tgt[:-1]) == target_text(refs[i])
        assert (lb.labels[i][~lb.attention_mask[i].bool()] == IGNORE).all()
        prompt_text = tok.decode(ids[1:len(ids) - len(tgt)])
        assert prompt_text == b.prompts(events)[i]


def test_prompt_batch_left_padded_and_truncation(ds, tok):
    ex = make_examples(ds, "nextitem", 6, "test")
    events = collate(ds, ex, np.arange(4))
    b = LLMBatcher(ds, tok, "nextitem", text_events=None, with_events=False)
    pb = b.prompt_batch(events)
    assert pb.events is None
    assert (pb.attention_mask[:, -1] == 1).all()  # every row ends with a real token
    for i in range(4):
        row = pb.input_ids[i][pb.attention_mask[i].bool()].tolist()
        assert row[0] == tok.bos_token_id and tok.decode(row[1:]) == b.prompts(events)[i]
        assert b.catalogue.entries[pb.entry_labels[i]] == pb.references[i]
    short = LLMBatcher(ds, tok, "nextitem", text_events=None, with_events=False, max_length=40)
    pb2 = short.prompt_batch(events, reserve=10)
    assert int(pb2.attention_mask.sum(1).max()) <= 30
    for i in range(4):  # the most recent history and the question survive, the oldest lines go
        row = pb2.input_ids[i][pb2.attention_mask[i].bool()].tolist()
        assert row[0] == tok.bos_token_id
        assert tok.decode(row[1:]).endswith("Answer:")
