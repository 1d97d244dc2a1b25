"""The native CUDA embedding_concat compiles for sm_80 and sm_90 and moves its rows 16 bytes at a time, read from
the SASS without a GPU (``userllm.kernels.cuda_check``: nvcc + cuobjdump). Skips where nvcc is not installed
(CI builds the CPU op only); the parsing and the expectations are also checked on canned results."""

import pytest

from userllm.kernels import cuda_check
from userllm.kernels.compile_check import CompileResult

needs_nvcc = pytest.mark.skipif(cuda_check.find_nvcc() is None or cuda_check.find_cuobjdump(cuda_check.find_nvcc())
                                is None, reason="nvcc / cuobjdump not installed")


@needs_nvcc
@pytest.mark.slow  # one nvcc run over torch's headers: ~40 CPU-s on the 2-core machine
def test_cuda_op_compiles_with_16_byte_accesses_and_no_spills():
    archs = (80, 90)
    results = cuda_check.check(archs)
    assert cuda_check.problems(results, archs) == []
    got = {(r.arch, r.kernel, r.config) for r in results}
    for arch in ("sm_80", "sm_90"):  # every dtype the op dispatches, vectorised and scalar
        for kernel in ("forward_kernel", "backward_kernel"):
            for config in ("float VEC=4", "float VEC=1", "BFloat16 VEC=8", "Half VEC=8", "double VEC=2"):
                assert (arch, kernel, config) in got, (arch, kernel, config)
    fwd = next(r for r in results if (r.arch, r.kernel, r.config) == ("sm_90", "forward_kernel", "BFloat16 VEC=8"))
    assert fwd.sass.get("STG.E.128") and not any(op.startswith("STG.E.U16") for op in fwd.sass)
    assert all(r.registers and r.registers <= 255 for r in results)


def _result(kernel, config, sass, arch="sm_90", local=0):
    return CompileResult(kernel, config, arch, ok=True, registers=40, local_bytes=local, sass=sass)


def test_problems_flags_scalar_stores_spills_and_missing_fallbacks():
    good = [_result("forward_kernel", "float VEC=4", {"LDG.E.128": 7, "LDG.E.64": 7, "STG.E.128": 1}),
            _result("forward_kernel", "float VEC=1", {"LDG.E": 28, "STG.E": 2}),
            _result("backward_kernel", "float VEC=4", {"LDG.E.128.CONSTANT": 2, "REDG.E.ADD.F32x4.FTZ.RN": 3}),
            _result("backward_kernel", "float VEC=1", {"LDG.E.CONSTANT": 3, "REDG.E.ADD.F32.FTZ.RN": 4})]
    assert cuda_check.problems(good, (90,)) == []
    split = [_result("forward_kernel", "float VEC=4", {"LDG.E.128": 7, "STG.E": 4})] + good[1:]
    assert any("not all STG.E.128" in p for p in cuda_check.problems(split, (90,)))
    spills = good[:3] + [_result("backward_kernel", "float VEC=1", good[3].sass, local=8)]
    assert any("spills" in p for p in cuda_check.problems(spills, (90,)))
    assert any("scalar instantiations" in p for p in cuda_check.problems(good[:1] + good[2:], (90,)))
    scalar_red = good[:2] + [_result("backward_kernel", "float VEC=4", {"LDG.E.128.CONSTANT": 2,
                                                                        "REDG.E.ADD.F32.FTZ.RN": 12})] + good[3:]
    assert any("vector atomics" in p for p in cuda_check.problems(scalar_red, (90,)))


def test_short_names_of_demangled_kernels():
    assert cuda_check._short("void userllm::(anonymous namespace)::forward_kernel<c10::BFloat16, 8>"
                             "(userllm::(anonymous namespace)::ForwardParams, c10::BFloat16*, int)") == \
        ("forward_kernel", "BFloat16 VEC=8")
    assert cuda_check._short("void userllm::(anonymous namespace)::backward_kernel<float, 4, float>(long const*)") == \
        ("backward_kernel", "float VEC=4")


def test_cli_without_nvcc_is_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(cuda_check, "find_nvcc", lambda: None)
    monkeypatch.setattr(cuda_check, "find_cuobjdump", lambda nvcc: None)
    assert cuda_check.main(["--arch", "90"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cuda_check: needs nvcc")
