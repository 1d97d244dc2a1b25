"""``--compile`` (userllm.kernels.compile.compile_model) against eager: the training step (loss, every gradient)
and greedy decoding give the same results, with the blocks that call the fused ops traced whole
(``fullgraph=True`` turns any graph break into an error, so a passing run proves the ops were traced).

The model (from test_fused_training_step) has all three ops: the encoder's ``embedding_concat``, the
Perceiver's ``latent_cross_attention`` and the LLM's grouped-query ``cached_cross_attention``. Backend
``aot_eager`` (Dynamo + AOT autograd, no code generation) keeps the test fast on 2 cores; the speed of
Inductor's code is measured in benchmarks/test_compile.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from test_fused_training_step import DEVICE, build_model, random_batch
from userllm import kernels
from userllm.kernels import compile as kcompile

# auto: on CPU the native embedding_concat (when built) and SDPA attention; on CUDA the Triton custom ops
# (the reference path under torch.compile is covered by tests/kernels)
BACKENDS = ["auto"]


def loss_and_grads(model, features, lengths, input_ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), features=features,
                lengths=lengths, labels=input_ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_step_matches_eager(backend):
    torch._dynamo.reset()
    model = build_model()
    compiled = copy.deepcopy(model)
    with kernels.use_backend(backend):
        names = kcompile.compile_model(compiled, backend="aot_eager")
        # every block type that calls a fused op, and nothing inside one twice
        assert any(n.startswith("xattn.") for n in names) and any(n.startswith("perceiver.") for n in names)
        assert any(n.startswith("encoder.") for n in names), names
        assert all(kcompile.is_compiled(compiled.get_submodule(n)) for n in names)
        for seed in (0, 1):            # a second batch: the compiled graphs are reused or re-specialised
            batch = random_batch(seed)
            ref_loss, ref_grads = loss_and_grads(model, *batch)
            loss, grads = loss_and_grads(compiled, *batch)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
            assert grads.keys() == ref_grads.keys()
            for name, ref in ref_grads.items():
                torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_decoding_matches_eager():
    """Greedy generation (prefill, then one-token steps over the cached user K/V) gives the same tokens."""
    torch._dynamo.reset()
    model = build_model().eval()
    compiled = copy.deepcopy(model)
    kcompile.compile_model(compiled, backend="aot_eager")
    features, lengths, input_ids = random_batch(3)
    kw = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), features=features, lengths=lengths,
              max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(**kw)
        got = compiled.generate(**kw)
    assert torch.equal(got, want)


def test_model_without_fused_blocks_is_left_alone():
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert kcompile.compile_model(plain) == [] and not kcompile.is_compiled(plain[0])
