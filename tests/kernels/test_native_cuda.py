"""The native CUDA embedding_concat (kernels/csrc/embedding_concat_cuda.cu) against the reference, on a GPU only:
the 16-byte-pack path (every width, column, row width and pointer 16-byte aligned: issue 15's 64 + 8 + 32
layout), the scalar fallback (odd widths; a table whose storage starts 4 bytes off), both poolings, every
dtype, and the out-of-range error. Skips without CUDA or without a library built with CUDA (benchmarks/
gpu_check.sh builds it and runs this file). The SASS side is tests/kernels/test_cuda_check.py."""

from __future__ import annotations

import zlib

import pytest
import torch

from precision import check_op
from userllm.kernels import native, reference

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and native.available("cuda")),
                                reason="needs a GPU and the native library built with CUDA")

ISSUE15 = [(1000, 64, None, torch.int64), (10, 8, None, torch.int32), (20, 32, 8, torch.int64)]  # packed
ODD = [(101, 13, None, torch.int64), (7, 5, 3, torch.int32), (23, 33, 8, torch.int64)]          # scalar


def make(specs, dtype, batch=5, length=37, seed=0, pad=0.3):
    gen = torch.Generator().manual_seed(seed)
    ids, tables = [], []
    for rows, dim, k, id_dtype in specs:
        shape = (batch, length) if k is None else (batch, length, k)
        x = torch.randint(0, rows, shape, generator=gen)
        x[torch.rand(shape, generator=gen) < pad] = -1
        if k is not None:
            x.view(-1, k)[0] = -1  # an event with no valid id
        ids.append(x.to(id_dtype).cuda())
        tables.append(torch.randn(rows, dim, generator=gen).to("cuda", dtype))
    return ids, tables


def check(ids, tables, pooling, seed):
    check_op(lambda ts: native.embedding_concat(ids, ts, pooling),
             lambda ts: reference.embedding_concat(ids, ts, pooling), tables,
             [f"feature {f}" for f in range(len(tables))], grad_seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("pooling", ["mean", "sum"])
@pytest.mark.parametrize("layout", ["packed", "scalar"])
def test_matches_reference(dtype, pooling, layout):
    seed = zlib.crc32(f"{dtype}{pooling}{layout}".encode())
    ids, tables = make(ISSUE15 if layout == "packed" else ODD, dtype, seed=seed)
    check(ids, tables, pooling, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_table_takes_the_scalar_path(dtype):
    ids, tables = make(ISSUE15, dtype, seed=3)
    base = torch.empty(tables[0].numel() + 1, device="cuda", dtype=dtype)[1:]  # storage 2-4 bytes off 16
    shifted = base.view_as(tables[0]).copy_(tables[0])
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    tables[0] = shifted
    check(ids, tables, "mean", seed=3)


def test_many_features_and_large_batch():
    # more features than one launch takes (kMaxFeatures = 16) and a grid over many events
    specs = [(50 + f, 8 * (1 + f % 4), None if f % 3 else 4, torch.int64) for f in range(18)]
    ids, tables = make(specs, torch.float32, batch=64, length=200, seed=7)
    check(ids, tables, "mean", seed=7)


def test_out_of_range_id_names_the_feature():
    ids, tables = make(ISSUE15, torch.float32, seed=5)
    ids[2][1, 2, 0] = 20
    with pytest.raises(IndexError, match="feature 2"):
        native.embedding_concat(ids, tables)
