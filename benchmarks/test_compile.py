"""``--compile`` against eager: the User-LLM training step (forward + backward) and greedy decoding.

One model, two copies: eager, and with :func:`userllm.kernels.compile.compile_model` (Inductor, the blocks
that call the fused ops compiled with ``fullgraph=True``); timed in interleaved rounds on the same batch
(``conftest.interleaved``: CPU time on CPU, do_bench on CUDA). The model: the embedded default LLM layout
(width 128, 4 query / 2 KV heads of 32, 2 layers) with gated cross-attention and a 16-latent Perceiver
over an autoregressive encoder (d_model 64) with the synthetic data set's features (item 401 x 32,
rating 10 x 8, category 13 x 8 with up to 3 per event); batch 16, 32 text tokens, 10 events. The kernel
backend is ``auto`` (CPU: native embedding_concat when built + SDPA attention; CUDA: Triton).

    PYTHONPATH=. pytest benchmarks/test_compile.py --benchmark-only -q -p no:cacheprovider

Under --benchmark-disable or USERLLM_BENCH_TINY=1 the model is smaller and the compile backend is
``aot_eager`` (traced, no code generation), so CI checks the plumbing in seconds.
"""

from __future__ import annotations

import copy

import pytest
import torch

from peers import TINY
from userllm.data.dataset import FeatureSpec
from userllm.encoders import AutoregressiveEncoder, EncoderConfig
from userllm.integration import UserLLM, UserLLMConfig
from userllm.integration.testing import open_gates, tiny_llm
from userllm.kernels.compile import compile_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VOCABS = {"item": 401, "rating": 10, "category": 13}


def build(small: bool) -> UserLLM:
    torch.manual_seed(0)
    specs = [FeatureSpec("item", VOCABS["item"], False), FeatureSpec("rating", VOCABS["rating"], False),
             FeatureSpec("category", VOCABS["category"], True)]
    d_model, hidden = (32, 32) if small else (64, 128)
    encoder = AutoregressiveEncoder(EncoderConfig(specs, feature_dims=[32, 8, 8], d_model=d_model, n_layers=2,
                                                  n_heads=2, dropout=0.0, max_len=16))
    llm = tiny_llm("llama", vocab_size=256, hidden=hidden, heads=4, kv_heads=2, layers=2)
    model = UserLLM(llm, encoder, UserLLMConfig(integration="xattn", perceiver_latents=16, xattn_kv_heads=2))
    open_gates(model, 0.5)
    return model.to(DEVICE)


def batch(B: int, T: int, N: int):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, N + 1, (B,), generator=g)
    lengths[0] = 0                                             # a user without history
    real = torch.arange(N)[None, :] < lengths[:, None]
    item = torch.randint(1, VOCABS["item"], (B, N), generator=g).masked_fill(~real, -1)
    rating = torch.randint(1, VOCABS["rating"], (B, N), generator=g).masked_fill(~real, -1)
    cat = torch.randint(1, VOCABS["category"], (B, N, 3), generator=g)
    cat = cat.masked_fill(torch.rand(B, N, 3, generator=g) < 0.4, -1).masked_fill(~real[..., None], -1)
    input_ids = torch.randint(3, 256, (B, T), generator=g)
    return [x.to(DEVICE) for x in (item, rating, cat)], lengths.to(DEVICE), input_ids.to(DEVICE)


@pytest.fixture(scope="module")
def models(request):
    small = TINY or bool(request.config.getoption("benchmark_disable", default=False))
    torch._dynamo.reset()
    eager = build(small)
    compiled = copy.deepcopy(eager)
    names = compile_model(compiled, backend="aot_eager" if small else "inductor")
    return {"eager": eager, "compiled": compiled, "small": small, "names": names}


def _info(benchmark, models, **extra):
    benchmark.extra_info.update(compiled_blocks=len(models["names"]), device=DEVICE.type, **extra)


def test_compile_training_step(compare, benchmark, models):
    B, T, N = (2, 6, 5) if models["small"] else (16, 32, 10)
    features, lengths, input_ids = batch(B, T, N)
    mask = torch.ones_like(input_ids)

    def step(model):
        model.train()

        def run():
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=input_ids, attention_mask=mask, features=features, lengths=lengths,
                         labels=input_ids).loss
            loss.backward()
            return [loss.detach()] + [p.grad for p in model.parameters() if p.grad is not None]
        return run

    _info(benchmark, models, batch=B, text_len=T, history=N)
    compare({"eager": step(models["eager"]), "compiled": step(models["compiled"])}, "compiled", tol=1e-4)


def test_compile_decoding(compare, benchmark, models):
    B, T, N, new = (2, 4, 5, 3) if models["small"] else (8, 16, 10, 8)
    features, lengths, input_ids = batch(B, T, N)
    kw = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), features=features, lengths=lengths,
              max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    def generate(model):
        model.eval()

        def run():
            with torch.no_grad():
                return model.generate(**kw).float()
        return run

    _info(benchmark, models, batch=B, prompt_len=T, history=N, new_tokens=new)
    compare({"eager": generate(models["eager"]), "compiled": generate(models["compiled"])}, "compiled", tol=0.0)
