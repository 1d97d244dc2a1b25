"""The LLM loader: embedded default (tiny Llama + BPE tokenizer cached beside the data) and local HF dirs."""

from __future__ import annotations

import pytest
import torch

from userllm.errors import UserError
from userllm.llm import DefaultLLMConfig, cached_tokenizer, load_llm, load_llm_spec, save_llm_spec

TEXTS = ["The Crimson Harbor (1994)", "The Crimson Harbor II (1997)", "Silent Garden (2001)", "Drama",
         "Comedy", "Sci-Fi", "A solid drama pick. I enjoyed most of it.", "Which item will the user interact "
         "with next?\nAnswer:"] * 20
SMALL = DefaultLLMConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=400)


def test_default_llm_is_small_gqa_llama_with_special_tokens(tmp_path):
    model, tok = load_llm(None, texts=TEXTS, cache_dir=tmp_path, default_config=SMALL)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_key_value_heads < cfg.num_attention_heads
    assert model.get_input_embeddings().weight.shape[0] == len(tok) <= 400
    assert {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id} == {0, 1, 2}
    # byte-level BPE: any text round-trips, also characters never seen in training
    for text in [" The Crimson Harbor II (1997)", "ünïcode ☃ 42"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.pad_token_id not in ids and tok.decode(ids) == text
    out = model(input_ids=torch.tensor([tok(" Drama")["input_ids"]]))
    assert out.logits.shape[-1] == len(tok)


def test_default_llm_is_seeded_and_tokenizer_cached(tmp_path):
    m1, t1 = load_llm(None, texts=TEXTS, cache_dir=tmp_path, default_config=SMALL, seed=3)
    entries = list(tmp_path.glob("tokenizer-*/tokenizer.json"))
    assert len(entries) == 1
    mtime = entries[0].stat().st_mtime_ns
    m2, t2 = load_llm(None, texts=TEXTS, cache_dir=tmp_path, default_config=SMALL, seed=3)
    assert entries[0].stat().st_mtime_ns == mtime  # reused, not retrained
    assert t1.get_vocab() == t2.get_vocab()
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    # a different corpus is a different cache entry
    cached_tokenizer(TEXTS + ["Western"] * 5, tmp_path, 400)
    assert len(list(tmp_path.glob("tokenizer-*"))) == 2


def test_load_local_hf_dir_and_errors(tmp_path):
    model, tok = load_llm(None, texts=TEXTS, cache_dir=tmp_path / "cache", default_config=SMALL)
    d = tmp_path / "hf"
    model.save_pretrained(d)
    with pytest.raises(UserError, match=f"{d}.*no tokenizer"):
        load_llm(d)
    tok.save_pretrained(d)
    m2, t2 = load_llm(d)
    assert t2.get_vocab() == tok.get_vocab() and t2.eos_token_id == tok.eos_token_id
    ids = torch.tensor([[1, 5, 9]])
    torch.testing.assert_close(m2(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(UserError, match="no such directory"):
        load_llm(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_llm(tmp_path / "empty")


def test_gpt2_style_tokenizer_gets_a_pad_token(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = load_llm(None, texts=TEXTS, cache_dir=tmp_path, default_config=SMALL)
    tok.pad_token = None
    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2)).save_pretrained(d)
    tok.save_pretrained(d)
    _, t2 = load_llm(d)
    assert t2.pad_token_id == t2.eos_token_id


def test_spec_round_trip(tmp_path):
    model, tok = load_llm(None, texts=TEXTS, cache_dir=tmp_path, default_config=SMALL)
    save_llm_spec(tmp_path / "spec", model, tok)
    m2, t2 = load_llm_spec(tmp_path / "spec")
    assert t2.get_vocab() == tok.get_vocab()
    assert m2.config.hidden_size == 32 and sum(p.numel() for p in m2.parameters()) == \
        sum(p.numel() for p in model.parameters())


def test_sized_default_llm_layouts():
    assert DefaultLLMConfig.sized(128, 2) == DefaultLLMConfig()       # the embedded default is the small size
    big = DefaultLLMConfig.sized(1024, 8)
    assert (big.num_attention_heads, big.num_key_value_heads, big.intermediate_size) == (16, 8, 3072)
    # the benchmark's ">= ~100M parameter" LLM, counted on the meta device (no memory)
    from transformers import LlamaConfig, LlamaForCausalLM
    from dataclasses import asdict
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**asdict(big)))
    assert 100e6 < sum(p.numel() for p in model.parameters()) < 110e6
    with pytest.raises(ValueError, match="head size 64"):
        DefaultLLMConfig.sized(544, 2)


@pytest.mark.parametrize("damage", ["garble", "truncate", "delete"])
def test_damaged_tokenizer_cache_entry_is_rebuilt(tmp_path, damage):
    _, good = load_llm(None, texts=TEXTS, cache_dir=tmp_path, default_config=SMALL, log=None)
    (path,) = tmp_path.glob("tokenizer-*/tokenizer.json")
    if damage == "garble":
        path.write_text("{not json")
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.unlink()
    logs: list[str] = []
    _, healed = load_llm(None, texts=TEXTS, cache_dir=tmp_path, default_config=SMALL, log=logs.append)
    assert any("is unusable" in line for line in logs) and healed.get_vocab() == good.get_vocab()
    logs.clear()
    _, again = load_llm(None, texts=TEXTS, cache_dir=tmp_path, default_config=SMALL, log=logs.append)
    assert logs == [] and again.get_vocab() == good.get_vocab()


def test_checkpoint_saved_in_bf16_loads_in_float32(tmp_path):
    """Hub checkpoints are mostly bf16; training keeps float32 weights (``-h``: CPU runs float32)."""
    model, tok = load_llm(None, texts=TEXTS, cache_dir=tmp_path, default_config=SMALL, log=None)
    d = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(d)
    tok.save_pretrained(d)
    loaded, _ = load_llm(d)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    save_llm_spec(tmp_path / "spec", loaded, tok)
    rebuilt, _ = load_llm_spec(tmp_path / "spec")
    assert {p.dtype for p in rebuilt.parameters()} == {torch.float32}
    ids = torch.tensor([[1, 5, 9]])
    model.float()   # the bf16-rounded weights, exactly representable in float32
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
