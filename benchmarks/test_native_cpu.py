"""CPU benchmark of embedding_concat: the native C++ op against what a PyTorch user would write, in one run.

Candidates, timed on the same inputs in interleaved rounds (``conftest.interleaved``: medians, spread):
``native`` (kernels/csrc/embedding_concat_cpu.cpp), ``embedding_bag`` (the peer of issue 15:
``F.embedding_bag(..., mode="sum", per_sample_weights=valid / count)`` per feature + ``cat``, see
benchmarks/peers.py), ``torch.compile(embedding_bag)``, the eager reference and ``torch.compile`` of it.
Directions: forward (under no_grad) and forward + backward (gradients of every table). Threads: 1 and 2.

Shapes (fp32):
  issue15          64 x 200 events; item 100k x 64, rating 10 x 8 (int32 ids), genres 20 x 32 with 1-8 of 8
  default_encoder  64 x 51 (pretraining batch, window 50 + 1); the synthetic data set's vocabularies with the
                   encoder's default widths: item 401 x 32, rating 10 x 8, category 13 x 8 with 1-3 of 3
  ml_latest_small  64 x 51; item 9725 x 64, rating 11 x 8, category 20 x 16 with 1-8 of 8
Targets (issue 15): native >= 1.5x embedding_bag and >= 1x its torch.compile, both directions, 1 and 2
threads, every shape. ``extra_info`` holds the medians, spreads, ratios, GB/s of the native forward and
its fraction of the measured copy bandwidth (see benchmarks/RESULTS.md).

    PYTHONPATH=. pytest benchmarks/test_native_cpu.py --benchmark-only -q -p no:cacheprovider \
        --benchmark-json=native_cpu.json && python benchmarks/summarize.py native_cpu.json

With --benchmark-disable (CI) every case runs once at a small shape and is checked against the reference.
"""

from __future__ import annotations

import pytest
import torch

from peers import embedding_bag_concat, embedding_bytes
from userllm.kernels import native, reference

pytestmark = pytest.mark.skipif(not native.available("cpu"), reason="native library not built")

# name -> (B, L, [(V, D, K: None = one id per event, else up to K ids per event)])
SHAPES = {
    "issue15": (64, 200, [(100_000, 64, None), (10, 8, None), (20, 32, 8)]),
    "default_encoder": (64, 51, [(401, 32, None), (10, 8, None), (13, 8, 3)]),
    "ml_latest_small": (64, 51, [(9725, 64, None), (11, 8, None), (20, 16, 8)]),
}
SMALL = (4, 16, [(1000, 64, None), (10, 8, None), (20, 32, 8)])
_compiled: dict[str, object] = {}


def inputs(shape):
    """ids (item int64 [B, L], rating int32 [B, L], multi-valued int64 [B, L, K] with 1..K valid ids
    first, then padding -1) and fp32 tables [V, D] requiring grad."""
    B, L, specs = shape
    gen = torch.Generator().manual_seed(0)
    ids, tables = [], []
    for f, (V, D, K) in enumerate(specs):
        if K is None:
            x = torch.randint(0, V, (B, L), generator=gen, dtype=torch.int32 if f == 1 else torch.int64)
        else:
            x = torch.randint(0, V, (B, L, K), generator=gen)
            count = torch.randint(1, K + 1, (B, L, 1), generator=gen)
            x[torch.arange(K).expand_as(x) >= count] = -1
        ids.append(x)
        tables.append(torch.randn(V, D, generator=gen).requires_grad_())
    return ids, tables


def candidates_for(disabled: bool) -> dict:
    fns = {"native": native.embedding_concat, "embedding_bag": embedding_bag_concat,
           "eager": reference.embedding_concat}
    if not disabled:  # compiling is slow; the compiled paths are covered by tests/kernels
        for name, fn in (("torch.compile(embedding_bag)", embedding_bag_concat),
                         ("torch.compile", reference.embedding_concat)):
            if name not in _compiled:
                _compiled[name] = torch.compile(fn, fullgraph=True, dynamic=False)
            fns[name] = _compiled[name]
    return fns


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("direction", ["forward", "forward_backward"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_embedding_concat_cpu(compare, benchmark, threads, shape, direction):
    ids, tables = inputs(SMALL if benchmark.disabled else SHAPES[shape])
    grad = torch.randn(*ids[0].shape[:2], sum(t.shape[1] for t in tables), generator=torch.Generator().manual_seed(1))

    def runner(fn):
        if direction == "forward":
            def forward():
                with torch.no_grad():
                    return fn(ids, tables, "mean")
            return forward
        return lambda: torch.autograd.grad(fn(ids, tables, "mean"), tables, grad)

    fns = candidates_for(benchmark.disabled)
    candidates = {"eager": runner(fns.pop("eager"))}
    candidates.update({name: runner(fn) for name, fn in fns.items()})
    benchmark.extra_info.update(shape=shape, threads=threads, direction=direction)
    compare(candidates, "native", bytes_moved=embedding_bytes(ids, tables) if direction == "forward" else None,
            tol=1e-5)
