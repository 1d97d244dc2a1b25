"""One prompt path: the prompts ``python -m userllm.generate`` builds for dataset users are the prompts the
model was trained and evaluated on, token for token, for every task and every way the history reaches the
LLM (cross-attention, soft prompt, TextPrompt, mixed context)."""

from __future__ import annotations

import numpy as np
import pytest

from userllm import factory
from userllm.config import TASKS, TrainConfig
from userllm.data.examples import collate, make_examples
from userllm.generate import build_prompts, dataset_requests, read_histories


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def tiny(cache: str, **over) -> TrainConfig:
    opts = dict(synthetic_users=24, synthetic_items=30, synthetic_events=12, window=6, llm_hidden=32, llm_layers=1,
                tokenizer_vocab=400, encoder_dim=16, encoder_layers=1, pretrain_steps=0, llm_pretrain_steps=0,
                cache_dir=cache)
    return TrainConfig(**{**opts, **over})


MODELS = {"xattn": {}, "softprompt": {"integration": "softprompt", "soft_prompt_tokens": 3},
          "textprompt": {"baseline": "textprompt"}, "mixed": {"text_events": 2}}


@pytest.mark.parametrize("model_kind", list(MODELS))
@pytest.mark.parametrize("task", TASKS)
def test_generation_prompts_are_the_training_prompts(cache, task, model_kind):
    cfg = tiny(cache, task=task, **MODELS[model_kind])
    ds = factory.load_data(cfg)
    llm, tok = factory.build_llm(cfg, ds, log=None)
    encoder = None if cfg.text_prompt else factory.build_encoder(cfg, ds)
    model = factory.build_model(cfg, llm, encoder)
    batcher = factory.make_batcher(cfg, ds, tok, model)

    examples = make_examples(ds, task, cfg.window, "test")
    idx = np.arange(min(6, len(examples)))
    events = collate(ds, examples, idx)
    trained_texts = batcher.prompts(events)
    train = batcher.train_batch(events)
    evaluated = batcher.prompt_batch(events)

    requests = dataset_requests(batcher, cfg.window, examples.user[idx].tolist(), "test")
    texts, ids = build_prompts(batcher, requests)
    assert texts == trained_texts
    for b, gen_ids in enumerate(ids):
        n_prompt = int((train.labels[b] == -100).logical_and(train.attention_mask[b] == 1).sum())
        assert gen_ids == train.input_ids[b, :n_prompt].tolist()              # the training prompt
        row = evaluated.input_ids[b][evaluated.attention_mask[b] == 1].tolist()
        assert gen_ids == row                                                # the evaluation prompt
    if cfg.text_prompt or cfg.text_events:
        assert all(t.startswith("History:\n1. ") for t in texts)
    else:
        assert not any("History:" in t for t in texts)


def test_a_json_history_of_a_dataset_window_gets_its_prompt(cache, tmp_path):
    """A history given as raw ids (``--histories``) renders like the same events from the dataset."""
    import json

    cfg = tiny(cache, baseline="textprompt")
    ds = factory.load_data(cfg)
    llm, tok = factory.build_llm(cfg, ds, log=None)
    batcher = factory.make_batcher(cfg, ds, tok, factory.build_model(cfg, llm, None))
    (req,) = dataset_requests(batcher, cfg.window, [3], "test")
    raw_items = ds.events.items.raw_ids[ds.item_index[req.items]]
    ratings = [ds.vocabs["rating"].token(r) for r in req.ratings]
    path = tmp_path / "h.json"
    path.write_text(json.dumps([[{"item": str(i), "rating": float(r)} for i, r in zip(raw_items, ratings)]]))
    (from_json,) = read_histories(path, batcher, cfg.window)
    assert build_prompts(batcher, [from_json])[0] == build_prompts(batcher, [req])[0]
