"""Causal-LM pretraining of the embedded default LLM on the dataset's text: it learns, it is cached, and
a User-LLM ``enc`` run on top of it trains only what lies outside the (frozen, pretrained) LLM."""

from __future__ import annotations

import json

import pytest
import torch

from userllm.llm import (DefaultLLMConfig, LMPretrainConfig, cached_pretrained_llm, corpus_token_stream, lm_batch,
                         load_llm, pretrain_default_llm)

TEXTS = ["The Crimson Harbor (1994)", " The Crimson Harbor (1994)", "The Crimson Harbor II (1997)",
         "Silent Garden (2001)", " Silent Garden (2001)", "Drama", " Drama", "Comedy", "Sci-Fi",
         "Silent Garden (2001) | Drama, Sci-Fi", "A solid drama pick. I enjoyed most of it.",
         "Which item will the user interact with next?\nAnswer:"] * 10
SMALL = DefaultLLMConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=400)
RECIPE = dict(batch_size=8, block=32, warmup=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_stream_and_batches_are_deterministic(tmp_path):
    _, tok = load_llm(None, texts=TEXTS, cache_dir=tmp_path, default_config=SMALL)
    stream = corpus_token_stream(TEXTS, tok, seed=0)
    # every text is one <s> ... </s> document
    assert int((stream == tok.bos_token_id).sum()) == int((stream == tok.eos_token_id).sum()) == len(TEXTS)
    a, b = lm_batch(stream, 5, 4, 16, seed=0), lm_batch(stream, 5, 4, 16, seed=0)
    assert a.shape == (4, 17) and torch.equal(a, b)
    assert not torch.equal(a, lm_batch(stream, 6, 4, 16, seed=0))
    # a stream shorter than one window is repeated rather than failing
    assert lm_batch(stream[:5], 0, 2, 16, seed=0).shape == (2, 17)


def test_pretraining_lowers_the_corpus_loss_and_keeps_the_callers_rng(tmp_path):
    model, tok = load_llm(None, texts=TEXTS, cache_dir=tmp_path, default_config=SMALL)
    held_out = lm_batch(corpus_token_stream(TEXTS, tok, seed=1), 0, 8, 32, seed=99)
    with torch.no_grad():
        before = model(input_ids=held_out, labels=held_out).loss.item()
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    info = pretrain_default_llm(model, tok, TEXTS, LMPretrainConfig(steps=40, **RECIPE), log=None)
    assert torch.equal(torch.rand(3), expected_draw)  # pretraining ran on a forked RNG
    with torch.no_grad():
        after = model(input_ids=held_out, labels=held_out).loss.item()
    assert info["final_loss"] < 0.7 * info["first_loss"]
    assert after < 0.7 * before
    # it learnt the corpus: after "The Crimson Harbor" the year or " II" is far likelier than at random
    ids = torch.tensor([[tok.bos_token_id] + tok("The Crimson Harbor", add_special_tokens=False)["input_ids"]])
    nxt = tok(" (1994)", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        p = model(input_ids=ids).logits[0, -1].softmax(-1)[nxt].item()
    assert p > 10 / len(tok)


def test_pretrained_weights_are_cached_and_keyed(tmp_path):
    logs: list[str] = []
    recipe = LMPretrainConfig(steps=6, **RECIPE)
    m1, tok = load_llm(None, texts=TEXTS, cache_dir=tmp_path, default_config=SMALL)
    random_init = _state(m1)
    info1 = cached_pretrained_llm(m1, tok, TEXTS, tmp_path, recipe, model_config=SMALL, log=logs.append)
    assert not info1["cached"]
    entries = list(tmp_path.glob("llm-*"))
    assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()
    assert json.loads((entries[0] / "pretrain.json").read_text())["steps"] == 6
    assert any(not torch.equal(random_init[k], v) for k, v in m1.state_dict().items())
    mtime = (entries[0] / "model.safetensors").stat().st_mtime_ns

    m2, _ = load_llm(None, texts=TEXTS, cache_dir=tmp_path, default_config=SMALL)
    info2 = cached_pretrained_llm(m2, tok, TEXTS, tmp_path, recipe, model_config=SMALL, log=logs.append)
    assert info2["cached"] and info2["final_loss"] == info1["final_loss"]
    assert (entries[0] / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not retrained
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    # tied embeddings stay tied after loading from the cache
    assert m2.lm_head.weight.data_ptr() == m2.get_input_embeddings().weight.data_ptr()
    assert any("pretrained weights from" in line for line in logs)

    # other steps or another seed: another entry; load_llm(pretrain_steps=...) goes through the same cache
    load_llm(None, texts=TEXTS, cache_dir=tmp_path, default_config=SMALL, pretrain_steps=7, log=None)
    load_llm(None, texts=TEXTS, cache_dir=tmp_path, default_config=SMALL, pretrain_steps=7, seed=1, log=None)
    assert len(list(tmp_path.glob("llm-*"))) == 3
    m3, _ = load_llm(None, texts=TEXTS, cache_dir=tmp_path, default_config=SMALL, pretrain_steps=7, log=None)
    m4, _ = load_llm(None, texts=TEXTS, cache_dir=tmp_path, default_config=SMALL, pretrain_steps=7, log=None)
    assert len(list(tmp_path.glob("llm-*"))) == 3
    for k, v in m3.state_dict().items():
        assert torch.equal(v, m4.state_dict()[k]), k


def test_enc_run_on_the_pretrained_default_llm_trains_only_outside_it(tmp_path, monkeypatch):
    """A tiny ``python -m userllm.train --strategy enc`` run: LLM pretrained (cached), frozen, untouched."""
    from userllm import train as train_mod
    from userllm.config import TrainConfig

    cfg = TrainConfig(synthetic_users=16, synthetic_items=20, synthetic_events=10, window=5, llm_hidden=32,
                      llm_layers=1, tokenizer_vocab=300, encoder_dim=16, encoder_layers=1, pretrain_steps=0,
                      llm_pretrain_steps=15, strategy="enc", steps=4, batch_size=4, warmup=1, eval_users=2,
                      beams=3, eval_batch_size=2, threads=1, log_every=1, checkpoint_every=100,
                      cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"))
    seen = {}
    real_build_model = train_mod.build_model

    def spy(cfg_, llm, encoder):
        seen["llm_before"] = _state(llm)
        seen["model"] = model = real_build_model(cfg_, llm, encoder)
        return model

    monkeypatch.setattr(train_mod, "build_model", spy)
    train_mod.train(cfg)
    assert len(list((tmp_path / "cache").glob("llm-*"))) == 1   # the default LLM was pretrained and cached
    model = seen["model"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("llm.") for n in trainable)
    assert any(n.startswith("encoder.") for n in trainable) and any(n.startswith("xattn.") for n in trainable)
    # the LLM holds the cached pretrained weights, unchanged by the User-LLM training
    from safetensors.torch import load_file

    (entry,) = (tmp_path / "cache").glob("llm-*")
    cached = load_file(str(entry / "model.safetensors"))
    for k, v in model.llm.state_dict().items():
        assert torch.equal(v.cpu(), seen["llm_before"][k]), k
        if k in cached:
            assert torch.equal(v.cpu(), cached[k]), k


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_llm_cache_entry_is_rebuilt(tmp_path, damage):
    """A truncated or altered model.safetensors is reported and re-pretrained to exactly the weights an
    empty cache gives; the next run uses the healed entry."""
    recipe = LMPretrainConfig(steps=3, **RECIPE)

    def run(log):
        model, tok = load_llm(None, texts=TEXTS, cache_dir=tmp_path, default_config=SMALL, log=None)
        cached_pretrained_llm(model, tok, TEXTS, tmp_path, recipe, model_config=SMALL, log=log)
        return model

    good = run(None)
    (entry,) = tmp_path.glob("llm-*")
    weights = entry / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    logs: list[str] = []
    healed = run(logs.append)
    assert any("is unusable" in line and "rebuilding" in line for line in logs), logs
    for k, v in good.state_dict().items():
        assert torch.equal(v, healed.state_dict()[k]), k
    logs.clear()
    run(logs.append)
    assert any("pretrained weights from" in line for line in logs) and not any("unusable" in x for x in logs)
