"""CPU benchmark of embedding_concat: native C++ op vs eager reference vs torch.compile(reference).

Shape (a realistic CPU batch): 64 x 200 events; features item (100k x 64), rating (10 x 8), genres
(20 x 32, 1..8 per event, mean pooled); float32. Forward and backward (the backward alone: the graph is
built once and kept). Target from issue 4: on 2 CPU cores native >= 2x eager, forward and backward.

    PYTHONPATH=. pytest benchmarks/test_native_cpu.py --benchmark-columns=median,iqr,rounds \
        --benchmark-group-by=group --benchmark-sort=name

With --benchmark-disable (CI) every case runs once at a small shape, so the file cannot rot.
"""

from __future__ import annotations

import pytest
import torch

from userllm.kernels import native, reference

pytestmark = pytest.mark.skipif(not native.available("cpu"), reason="native library not built")

IMPLS = ["native", "eager", "compiled"]
_compiled = {}


def inputs(small: bool):
    gen = torch.Generator().manual_seed(0)
    batch, length = (4, 16) if small else (64, 200)
    item_rows = 1000 if small else 100_000
    item = torch.randint(0, item_rows, (batch, length), generator=gen)
    rating = torch.randint(0, 10, (batch, length), generator=gen, dtype=torch.int32)
    genres = torch.randint(0, 20, (batch, length, 8), generator=gen)
    count = torch.randint(1, 9, (batch, length, 1), generator=gen)
    genres[torch.arange(8).expand_as(genres) >= count] = -1  # 1..8 genres per event
    tables = [torch.randn(item_rows, 64, generator=gen), torch.randn(10, 8, generator=gen),
              torch.randn(20, 32, generator=gen)]
    return [item, rating, genres], [t.requires_grad_() for t in tables]


def op(impl: str):
    if impl == "native":
        return native.embedding_concat
    if impl == "eager":
        return reference.embedding_concat
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(reference.embedding_concat, fullgraph=True, dynamic=False)
    return _compiled["fn"]


@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark, impl):
    benchmark.group = "embedding_concat CPU forward"
    ids, tables = inputs(small=benchmark.disabled)
    fn = op(impl)
    with torch.no_grad():
        expected = reference.embedding_concat(ids, tables)
        fn(ids, tables)  # warm-up (compiles once)
        out = benchmark(fn, ids, tables, "mean")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_backward(benchmark, impl):
    benchmark.group = "embedding_concat CPU backward"
    ids, tables = inputs(small=benchmark.disabled)
    fn = op(impl)
    out = fn(ids, tables, "mean")
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(reference.embedding_concat(ids, tables), tables, grad)
    torch.autograd.grad(out, tables, grad, retain_graph=True)  # warm-up
    grads = benchmark(torch.autograd.grad, out, tables, grad, retain_graph=True)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
