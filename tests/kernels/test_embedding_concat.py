"""embedding_concat: Triton kernels (interpreted on CPU when there is no GPU) and the native op against the
reference.

Single- and multi-valued features, int32/int64 ids, padding ids (including events whose K ids are all
padding), L = 1, B = 1, tiny tables hit by every event (the backward's segment reduction across many
chunks), mean and sum pooling, fp32/bf16/fp16; forward and table gradients; out-of-range ids raise.
"""

import pytest
import torch

from precision import check_op
from userllm import kernels
from userllm.kernels import dispatch, reference
from userllm.kernels.ops.embedding_concat import embedding_concat as triton_embedding_concat

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
def make_features(B, L, specs, dtype, seed=0, device=DEVICE):
    """specs: (V, D, K or None, id dtype) per feature; ids in [-1, V) with ~20% padding for K features."""
    g = torch.Generator().manual_seed(seed)
    ids, tables = [], []
    for V, D, K, id_dtype in specs:
        shape = (B, L) if K is None else (B, L, K)
        x = torch.randint(0, V, shape, generator=g)
        if K is not None:
            x[torch.rand(shape, generator=g) < 0.2] = -1
            x[0, 0] = -1                      # an event with no valid id: zeros
            if L > 1:
                x[-1, -1, : K // 2] = -7      # any negative id is padding
        ids.append(x.to(device, id_dtype))
        tables.append(torch.randn(V, D, generator=g).to(device, dtype))
    return ids, tables


CASES = {  # name: (B, L, feature specs)
    "paper_like": (3, 7, [(50, 24, None, torch.int64), (3, 8, None, torch.int32), (7, 16, 4, torch.int64)]),
    "tiny_table_hot": (4, 30, [(2, 8, None, torch.int64), (5, 4, 3, torch.int32)]),  # runs span many chunks
    "single_event": (1, 1, [(9, 16, 2, torch.int64), (4, 40, None, torch.int64)]),  # B = L = 1
}


@pytest.mark.parametrize("pooling", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_reference(case, dtype, pooling):
    B, L, specs = CASES[case]
    ids, tables = make_features(B, L, specs, dtype, seed=len(case))
    out = check_op(lambda ts: triton_embedding_concat(ids, ts, pooling),
                   lambda ts: reference.embedding_concat(ids, ts, pooling), tables,
                   [f"feature {f}" for f in range(len(tables))], grad_seed=2)
    assert out.shape == (B, L, sum(s[1] for s in specs))


def test_fp16_and_all_padding_event():
    ids, tables = make_features(2, 3, [(6, 16, 3, torch.int64)], torch.float16)
    ids[0][1, 2] = -1
    out = check_op(lambda ts: triton_embedding_concat(ids, ts), lambda ts: reference.embedding_concat(ids, ts),
                   tables, grads=False)
    assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))  # every id of event (0, 0) is padding
    assert torch.equal(out[1, 2], torch.zeros_like(out[1, 2]))


@pytest.mark.parametrize("backend", ["reference", "triton", "native"])
def test_out_of_range_id_names_the_feature(backend):
    if backend == "native" and not dispatch.native_available(torch.device(DEVICE).type):
        pytest.skip("native kernel library not built")
    ids, tables = make_features(2, 3, [(5, 8, None, torch.int64), (4, 8, 2, torch.int32)], torch.float32)
    ids[1][1, 2, 1] = 4
    with kernels.use_backend(backend), pytest.raises(IndexError, match="feature 1"):
        kernels.embedding_concat(ids, tables)


def test_native_matches_reference():
    if not dispatch.native_available("cpu"):
        pytest.skip("native kernel library not built")
    ids, tables = make_features(3, 5, CASES["paper_like"][2], torch.float32, device="cpu")
    with kernels.use_backend("native"):
        check_op(lambda ts: kernels.embedding_concat(ids, ts), lambda ts: reference.embedding_concat(ids, ts),
                 tables, "abc")


def test_opcheck():
    ids, tables = make_features(2, 3, [(6, 16, None, torch.int64), (5, 8, 3, torch.int32)], torch.float32)
    args = (ids, [t.requires_grad_() for t in tables], "mean")
    torch.library.opcheck(torch.ops.userllm.triton_embedding_concat.default, args)


class _FeatureEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tables = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(20, 16)),
                                              torch.nn.Parameter(torch.randn(4, 8))])
        self.proj = torch.nn.Linear(24, 8)

    def forward(self, items, genres):
        return self.proj(kernels.embedding_concat([items, genres], list(self.tables)))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_torch_compile_fullgraph(backend):
    torch.manual_seed(0)
    model = _FeatureEmbedding().to(DEVICE)
    ids, _ = make_features(2, 5, [(20, 16, None, torch.int64), (4, 8, 3, torch.int64)], torch.float32)
    with kernels.use_backend(backend):
        eager = model(*ids)
        g_eager = torch.autograd.grad(eager.square().sum(), list(model.tables))
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(*ids)
        g_comp = torch.autograd.grad(out.square().sum(), list(model.tables))
    torch.testing.assert_close(out, eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)
