"""The native (C++) embedding_concat against the reference, its errors, torch.library checks and the loader.

Tests that need the built library skip when it is absent (build it with
``pip install --no-build-isolation -e .`` or ``cmake -S . -B build && cmake --build build``); the loader
tests run in a subprocess and need nothing built. Results are checked with flash-attn's rule
(``precision.py``): the error against the float64 reference on the same rounded inputs may be at most twice
the error of the reference run in the tables' own precision, plus a few ulps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch

from precision import check_op
from userllm.kernels import native, reference

REPO = Path(__file__).resolve().parents[2]

needs_native = pytest.mark.skipif(
    not native.available("cpu"), reason="native library not built (pip install --no-build-isolation -e . "
                                        "or cmake -S . -B build && cmake --build build)")


def make_inputs(gen, batch, length, specs, dtype, pad=0.3):
    """Random ids/tables; specs are (rows, dim, k or None for [B, L] ids, id dtype)."""
    ids, tables = [], []
    for rows, dim, k, id_dtype in specs:
        shape = (batch, length) if k is None else (batch, length, k)
        x = torch.randint(0, rows, shape, generator=gen)
        x[torch.rand(shape, generator=gen) < pad] = -1
        if k is not None and batch * length > 1:
            x.view(-1, k)[0] = -1  # an event with no valid id of this feature
        ids.append(x.to(id_dtype))
        tables.append(torch.randn(rows, dim, generator=gen).to(dtype))
    return ids, tables


def check_against_reference(ids, tables, pooling, gen):
    """Output and table gradients within flash-attn's bound of the reference (``precision.py``)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    check_op(lambda ts: native.embedding_concat(ids, ts, pooling),
             lambda ts: reference.embedding_concat(ids, ts, pooling), tables,
             [f"feature {f}" for f in range(len(tables))], grad_seed=seed)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("pooling", ["mean", "sum"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_matches_reference(dtype, pooling, k):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{pooling}{k}".encode()))
    specs = [(101, 13, None, torch.int64), (10, 8, None, torch.int32), (23, 33, k, torch.int64),
             (7, 3, k, torch.int32)]
    ids, tables = make_inputs(gen, 3, 7, specs, dtype)
    check_against_reference(ids, tables, pooling, gen)


@needs_native
@pytest.mark.parametrize("batch,length", [(1, 1), (5, 1), (2, 0), (0, 4)])
def test_edge_shapes(batch, length):
    gen = torch.Generator().manual_seed(batch * 10 + length)
    ids, tables = make_inputs(gen, batch, length, [(5, 4, None, torch.int64), (9, 6, 2, torch.int32)],
                              torch.float32)
    check_against_reference(ids, tables, "mean", gen)


@needs_native
def test_all_padding_gives_zeros_and_no_gradient():
    ids = [torch.full((2, 3), -1), torch.full((2, 3, 4), -5, dtype=torch.int32)]
    tables = [torch.randn(4, 5, requires_grad=True), torch.randn(6, 2, requires_grad=True)]
    out = native.embedding_concat(ids, tables)
    assert out.shape == (2, 3, 7) and not out.any()
    out.sum().backward()
    assert not tables[0].grad.any() and not tables[1].grad.any()


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_backward_strategies_and_hot_rows(threads):
    """Enough events for several partitions: a tiny table every event hits (per-partition partial sums),
    a large table (row ownership; 3 threads take the non-power-of-two path), and a pooled feature."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        ids, tables = make_inputs(gen, 8, 130, [(10, 8, None, torch.int64), (3000, 16, None, torch.int32),
                                                (20, 32, 5, torch.int64)], torch.float32, pad=0.1)
        ids[0][:, :50] = 3  # one hot row
        check_against_reference(ids, tables, "mean", gen)
    finally:
        torch.set_num_threads(prev)


@needs_native
def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(3)
    ids, tables = make_inputs(gen, 6, 5, [(30, 8, None, torch.int64), (12, 6, 4, torch.int64)], torch.float32)
    ids = [ids[0].t().contiguous().t(), ids[1][:, :, ::2]]
    tables = [torch.randn(8, 30, generator=gen).t(), torch.randn(12, 12, generator=gen)[:, ::2]]
    check_against_reference(ids, tables, "sum", gen)


@needs_native
@pytest.mark.parametrize("multi", [False, True])
def test_out_of_range_names_the_feature(multi):
    ids = [torch.zeros(2, 3, dtype=torch.int64), torch.zeros((2, 3, 2) if multi else (2, 3), dtype=torch.int32)]
    ids[1].view(-1)[4] = 12
    tables = [torch.randn(4, 2), torch.randn(10, 3)]
    message = "feature 1 has id 12 but its table has only 10 rows"
    with pytest.raises(IndexError, match=message):
        native.embedding_concat(ids, tables)
    # The kernel checks too (it is all that checks under torch.compile), with the same message.
    with pytest.raises(IndexError, match=message):
        torch.ops.userllm_native.embedding_concat(ids, tables, "mean")
    with pytest.raises(IndexError, match=message):
        torch.ops.userllm_native.embedding_concat_backward(torch.zeros(2, 3, 5), ids, [4, 10], [2, 3], "mean")


@needs_native
def test_invalid_arguments_match_reference():
    ids, tables = [torch.zeros(2, 3, dtype=torch.int64)], [torch.randn(4, 2)]
    for bad in [dict(pooling="max"), dict(ids=ids + ids), dict(ids=[ids[0].float()]),
                dict(tables=[torch.randn(4, 2, 1)])]:
        args = dict(ids=ids, tables=tables, pooling="mean") | bad
        with pytest.raises(Exception) as ref_err:
            reference.embedding_concat(**args)
        with pytest.raises(type(ref_err.value), match="embedding_concat"):
            native.embedding_concat(**args)


@needs_native
@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_opcheck(pooling):
    gen = torch.Generator().manual_seed(11)
    ids, tables = make_inputs(gen, 2, 3, [(6, 4, None, torch.int32), (5, 3, 3, torch.int64)], torch.float32)
    tables = [t.requires_grad_() for t in tables]
    torch.library.opcheck(torch.ops.userllm_native.embedding_concat.default, (ids, tables, pooling))
    grad = torch.randn(2, 3, 7, generator=gen)
    torch.library.opcheck(torch.ops.userllm_native.embedding_concat_backward.default,
                          (grad, ids, [6, 5], [4, 3], pooling))


@needs_native
def test_torch_compile_fullgraph():
    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tables = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(9, 4)),
                                                  torch.nn.Parameter(torch.randn(5, 6))])

        def forward(self, ids):
            return native.embedding_concat(ids, list(self.tables), "mean").square().sum()

    model = Embed()
    gen = torch.Generator().manual_seed(5)
    ids, _ = make_inputs(gen, 3, 4, [(9, 4, None, torch.int64), (5, 6, 3, torch.int64)], torch.float32)
    eager = model(ids)
    eager_grads = torch.autograd.grad(eager, list(model.tables))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids)
    compiled_grads = torch.autograd.grad(compiled, list(model.tables))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


PROBE = """
    import importlib, os, sys, warnings
    import torch
    from userllm.kernels import native, reference
    for name, env in [("missing", {"USERLLM_NATIVE_LIB": sys.argv[1]}),
                      ("broken", {"USERLLM_NATIVE_LIB": sys.argv[2]}),
                      ("skip", {"USERLLM_SKIP_NATIVE": "1"})]:
        os.environ.update(env)
        native = importlib.reload(native)  # a fresh loader: nothing gets loaded in these scenarios
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = native.available() or native.available("cpu")
        print(name, "available", ok)
        for w in caught:
            print(name, "warning", w.category.__name__, str(w.message))
        ids, tables = [torch.tensor([[0, -1]])], [torch.randn(2, 3)]
        try:
            native.embedding_concat(ids, tables)
        except RuntimeError as exc:
            print(name, "raised", exc)
        print(name, "reference", tuple(reference.embedding_concat(ids, tables).shape))
        for key in env:
            del os.environ[key]
"""


@pytest.fixture(scope="module")
def loader_probe(tmp_path_factory):
    """Runs the loader in a fresh process with a missing, a broken and a skipped library."""
    tmp = tmp_path_factory.mktemp("native")
    missing, broken = tmp / "missing" / "_C.so", tmp / "_C.so"
    broken.write_bytes(b"not a shared object")
    env = {k: v for k, v in os.environ.items() if k not in ("USERLLM_NATIVE_LIB", "USERLLM_SKIP_NATIVE")}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(PROBE), str(missing), str(broken)],
                            capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**env, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    return {name: [line.split(" ", 1)[1] for line in lines if line.startswith(name + " ")]
            for name in ("missing", "broken", "skip")}, missing, broken


def test_missing_library_warns_once_and_falls_back(loader_probe):
    probe, missing, _ = loader_probe
    lines = probe["missing"]
    assert "available False" in lines
    warnings = [line for line in lines if line.startswith("warning")]
    assert len(warnings) == 1 and "RuntimeWarning" in warnings[0] and "native ops unavailable" in warnings[0]
    assert str(missing) in warnings[0] and "falls back" in warnings[0]
    assert any(line.startswith("raised") for line in lines)
    assert "reference (1, 2, 3)" in lines


def test_broken_library_warns_with_the_loader_error(loader_probe):
    probe, _, broken = loader_probe
    warnings = [line for line in probe["broken"] if line.startswith("warning")]
    assert "available False" in probe["broken"]
    assert len(warnings) == 1 and str(broken) in warnings[0]


def test_skip_env_disables_without_warning(loader_probe):
    probe, _, _ = loader_probe
    assert "available False" in probe["skip"]
    assert not any(line.startswith("warning") for line in probe["skip"])
