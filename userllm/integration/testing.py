"""Tiny random models for tests and examples (no downloads): HF causal LMs of several families built
from configs, and a minimal user encoder honouring the encoder contract."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gpt2", "gpt_neox")
# Layouts that once broke a generic assumption: OPT with projected embeddings (opt-350m: the input-embedding
# width differs from the residual width), Mamba (recurrent cache, no attention), Jamba (attention and Mamba
# blocks in one layer list, MoE), Mixtral and Qwen2-MoE (experts fused in 3-D parameters in transformers 5).
EDGE_FAMILIES = ("opt", "mamba", "jamba", "mixtral", "qwen2_moe")


def tiny_llm(family: str = "llama", vocab_size: int = 96, hidden: int = 32, layers: int = 2, heads: int = 4,
             kv_heads: int = 2, seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised causal LM of ``family`` (eval mode, float32, eager attention)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family in ("llama", "qwen2", "mistral", "gemma"):
        config_cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig,
                      "gemma": tf.GemmaConfig}[family]
        config = config_cls(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                            max_position_embeddings=128, **common, **overrides)
    elif family == "gpt2":
        config = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128, **common, **overrides)
    elif family == "gpt_neox":
        config = tf.GPTNeoXConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, max_position_embeddings=128, **common, **overrides)
    elif family == "opt":
        config = tf.OPTConfig(hidden_size=hidden, word_embed_proj_dim=hidden // 2, ffn_dim=2 * hidden,
                              num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=128,
                              **common, **overrides)
    elif family == "mamba":
        config = tf.MambaConfig(hidden_size=hidden, state_size=4, num_hidden_layers=layers, expand=2, conv_kernel=4,
                                **common, **overrides)
    elif family == "jamba":   # layer 1 (of every 2) attention, the others Mamba; MoE on odd layers
        config = tf.JambaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, num_key_value_heads=kv_heads, attn_layer_period=2,
                                attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
                                num_experts_per_tok=1, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2,
                                **common, **overrides)
    elif family == "mixtral":
        config = tf.MixtralConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=kv_heads, num_local_experts=2,
                                  num_experts_per_tok=1, max_position_embeddings=128, **common, **overrides)
    elif family == "qwen2_moe":
        config = tf.Qwen2MoeConfig(hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden,
                                   shared_expert_intermediate_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads, num_experts=2,
                                   num_experts_per_tok=1, max_position_embeddings=128, **common, **overrides)
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES + EDGE_FAMILIES}")
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(config).eval()


@dataclass
class ToyEncoderOutput:
    embeddings: torch.Tensor   # [B, L, d]
    mask: torch.Tensor         # [B, L] bool, True = real event


class ToyEncoder(nn.Module):
    """Sum of per-feature embeddings + a causal running mean: [B, L] int ids (-1 = padding) -> [B, L, d]."""

    def __init__(self, vocab_sizes: list[int], d_model: int = 16):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(v, d_model) for v in vocab_sizes)
        self.out = nn.Linear(d_model, d_model)
        self.output_dim = d_model

    def forward(self, features: list[torch.Tensor], lengths: torch.Tensor) -> ToyEncoderOutput:
        ids0 = features[0]
        mask = torch.arange(ids0.shape[1], device=ids0.device)[None, :] < lengths.to(ids0.device)[:, None]
        x = sum(t(f.clamp_min(0)) for t, f in zip(self.tables, features)) * mask[..., None]
        running = x.cumsum(1) / torch.arange(1, x.shape[1] + 1, device=x.device)[None, :, None]
        return ToyEncoderOutput(self.out(running) * mask[..., None], mask)


def toy_features(lengths: list[int], max_len: int | None = None, vocab_sizes: tuple[int, ...] = (20, 5),
                 seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random right-padded feature ids ([B, L] per feature, -1 padding) and lengths int64 [B]."""
    g = torch.Generator().manual_seed(seed)
    L = max_len or max(max(lengths), 1)
    lens = torch.tensor(lengths, dtype=torch.int64)
    pad = torch.arange(L)[None, :] >= lens[:, None]
    feats = [torch.randint(0, v, (len(lengths), L), generator=g).masked_fill(pad, -1) for v in vocab_sizes]
    return feats, lens


def sgd_steps(model: nn.Module, ids: torch.Tensor, features: list[torch.Tensor], lengths: torch.Tensor,
              steps: int, lr: float = 0.5) -> None:
    """``steps`` plain SGD steps of a UserLLM on the LM loss of ``ids`` [B, T] (labels = inputs)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(ids, features=features, lengths=lengths, labels=ids).loss.backward()
        opt.step()


def open_gates(model: nn.Module, value: float = 1.0) -> None:
    """Set every cross-attention gate of a UserLLM to ``value`` so the user side changes the output."""
    with torch.no_grad():
        for block in model.xattn:
            block.attn_gate.fill_(value)
            block.ffn_gate.fill_(value)


@contextmanager
def single_thread():
    """Run torch on one intra-op thread: for tiny models on a shared CPU, extra OpenMP threads only spin
    (measured ~30x slower per step on a loaded 2-core machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
