"""A User-LLM training step through the fused kernels equals the reference step: same loss, same gradients.

The model exercises all three ops: the autoregressive encoder's feature embedding (``embedding_concat``,
with a multi-valued genre feature), the Perceiver (``latent_cross_attention``) and the LLM's gated user
cross-attention with grouped-query heads (``cached_cross_attention``). On a GPU everything runs on it
(the compiled Triton kernels, the native CUDA op); without one the Triton kernels run in Triton's
interpreter (``tests/conftest.py`` sets it up) and the native backend is the C++ op.
"""

from __future__ import annotations

import pytest
import torch

from userllm import kernels
from userllm.data.dataset import FeatureSpec
from userllm.encoders import AutoregressiveEncoder, EncoderConfig
from userllm.integration import UserLLM, UserLLMConfig
from userllm.integration.testing import open_gates, tiny_llm
from userllm.kernels import native

VOCABS = {"item": 40, "rating": 6, "genre": 9}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(seed: int = 0) -> UserLLM:
    torch.manual_seed(seed)
    specs = [FeatureSpec("item", VOCABS["item"], False), FeatureSpec("rating", VOCABS["rating"], False),
             FeatureSpec("genre", VOCABS["genre"], True)]
    encoder = AutoregressiveEncoder(EncoderConfig(specs, feature_dims=[16, 4, 8], d_model=32, n_layers=1,
                                                  n_heads=2, dropout=0.0, max_len=16))
    llm = tiny_llm("llama", hidden=32, heads=4, kv_heads=2, seed=seed)
    model = UserLLM(llm, encoder, UserLLMConfig(integration="xattn", perceiver_latents=5, xattn_kv_heads=2))
    open_gates(model, 0.5)          # closed gates would hide the user side from the loss
    return model.to(DEVICE).train()


def random_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 0, 3, 11])          # a row without history, odd lengths
    B, L = len(lengths), int(lengths.max())
    real = torch.arange(L)[None, :] < lengths[:, None]
    item = torch.randint(1, VOCABS["item"], (B, L), generator=g).masked_fill(~real, -1)
    rating = torch.randint(1, VOCABS["rating"], (B, L), generator=g).masked_fill(~real, -1)
    genre = torch.randint(1, VOCABS["genre"], (B, L, 3), generator=g)
    genre = genre.masked_fill(torch.rand(B, L, 3, generator=g) < 0.3, -1).masked_fill(~real[..., None], -1)
    genre[0, 2] = -1                               # a real event with no genre at all
    input_ids = torch.randint(3, 96, (B, 9), generator=g)
    return [x.to(DEVICE) for x in (item, rating, genre)], lengths.to(DEVICE), input_ids.to(DEVICE)


def step(model: UserLLM, backend: str, seed: int):
    """One forward + backward; returns (loss, grads, names of the userllm custom ops that ran)."""
    features, lengths, input_ids = random_batch(seed)
    model.zero_grad(set_to_none=True)
    with kernels.use_backend(backend), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), features=features,
                    lengths=lengths, labels=input_ids)
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ops = {e.key for e in prof.key_averages() if e.key.startswith("userllm")}
    return out.loss.detach(), grads, ops


# The custom ops each backend must have run (the native library has no attention ops).
EXPECTED_OPS = {
    "triton": {"userllm::triton_embedding_concat", "userllm::triton_embedding_concat_backward",
               "userllm::triton_latent_cross_attention", "userllm::triton_latent_cross_attention_backward",
               "userllm::triton_cached_cross_attention", "userllm::triton_cached_cross_attention_backward"},
    "native": {"userllm_native::embedding_concat", "userllm_native::embedding_concat_backward"},
}
BACKENDS = ["triton", pytest.param("native", marks=pytest.mark.skipif(
    not native.available(DEVICE.type), reason=f"native library not built (for {DEVICE.type})"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_step_matches_reference(backend, seed):
    if backend == "triton" and not torch.cuda.is_available():
        from userllm.kernels.ops.attention import INTERPRETED
        if not INTERPRETED:
            pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    model = build_model()
    ref_loss, ref_grads, ref_ops = step(model, "reference", seed)
    fused_loss, fused_grads, fused_ops = step(model, backend, seed)
    assert not ref_ops
    assert EXPECTED_OPS[backend] <= fused_ops, fused_ops

    torch.testing.assert_close(fused_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == ref_grads.keys()
    # The user side must be in the comparison: encoder tables, Perceiver latents, cross-attention.
    for part in ("encoder.", "perceiver.", "xattn."):
        assert any(n.startswith(part) and g.abs().sum() > 0 for n, g in ref_grads.items()), part
    for name, ref in ref_grads.items():
        torch.testing.assert_close(fused_grads[name], ref, rtol=1e-4, atol=1e-6, msg=name)
