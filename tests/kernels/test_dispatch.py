"""The backend switch of userllm.kernels: environment variable, use_backend, automatic choice, errors."""

import pytest
import torch

import userllm.kernels as kernels
from userllm.kernels import dispatch, reference

CPU = torch.device("cpu")
OPS = ("embedding_concat", "latent_cross_attention", "cached_cross_attention")


@pytest.fixture(autouse=True)
def _clean_switch(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    with kernels.use_backend(None):
        yield


def test_public_api():
    assert set(kernels.__all__) == {*OPS, "use_backend", "get_backend"}
    for name in OPS:
        assert callable(getattr(kernels, name))
    # importing the Triton module must not replace the public op
    from userllm.kernels.embedding import embedding_concat as triton_impl  # noqa: F401
    assert kernels.embedding_concat is dispatch.embedding_concat


def test_environment_variable_and_use_backend(monkeypatch):
    assert kernels.get_backend() == "auto"
    monkeypatch.setenv(dispatch.ENV_VAR, " Reference ")
    assert kernels.get_backend() == "reference"
    with kernels.use_backend("triton"):
        assert kernels.get_backend() == "triton"
        with kernels.use_backend("native"):
            assert kernels.get_backend() == "native"
        assert kernels.get_backend() == "triton"
    assert kernels.get_backend() == "reference"
    kernels.use_backend("triton")  # plain call: a setter
    assert kernels.get_backend() == "triton"
    kernels.use_backend(None)
    assert kernels.get_backend() == "reference"


def test_unknown_backend_raises(monkeypatch):
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.use_backend("cuda")
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.get_backend()


@pytest.mark.parametrize("native", [True, False], ids=["native_built", "no_native"])
def test_auto_on_cpu(monkeypatch, native):
    monkeypatch.setattr(dispatch, "native_available", lambda device_type="cpu": native)
    assert dispatch.resolve("embedding_concat", CPU) == ("native" if native else "reference")
    assert dispatch.resolve("latent_cross_attention", CPU) == "reference"
    assert dispatch.resolve("cached_cross_attention", CPU) == "reference"
    assert dispatch.resolve("cached_cross_attention", torch.device("cuda")) == "triton"


def test_forced_backends(monkeypatch):
    monkeypatch.setattr(dispatch, "native_available", lambda device_type="cpu": False)
    monkeypatch.setattr(dispatch, "_warned", set())
    with kernels.use_backend("reference"):
        assert dispatch.resolve("embedding_concat", torch.device("cuda")) == "reference"
    with kernels.use_backend("native"):
        with pytest.warns(RuntimeWarning, match="native kernel library"):
            assert dispatch.resolve("embedding_concat", CPU) == "reference"
        assert dispatch.resolve("cached_cross_attention", CPU) == "reference"  # no native attention
    with kernels.use_backend("triton"):
        monkeypatch.setattr(dispatch, "triton_interpreted", lambda: False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            dispatch.resolve("embedding_concat", CPU)
        assert dispatch.resolve("embedding_concat", torch.device("cuda")) == "triton"


def test_calls_reach_the_selected_implementation(monkeypatch):
    calls = []
    real = reference.cached_cross_attention

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(reference, "cached_cross_attention", spy)
    q, kv = torch.randn(2, 1, 4, 16), torch.randn(2, 3, 2, 16)
    lens = torch.tensor([3, 1])
    with kernels.use_backend("reference"):
        kernels.cached_cross_attention(q, kv, kv, lens)
    assert len(calls) == 1
    if torch.cuda.is_available() or dispatch.triton_interpreted():
        with kernels.use_backend("triton"):
            out = kernels.cached_cross_attention(q, kv, kv, lens)
        assert len(calls) == 1  # the Triton op, not the reference
        assert torch.allclose(out, real(q, kv, kv, lens), atol=1e-5)
