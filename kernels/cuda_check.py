"""Compile the native CUDA ``embedding_concat`` (kernels/csrc/embedding_concat_cuda.cu) for sm_80 and sm_90 on
a machine without a GPU, and read its SASS: the ahead-of-time check :mod:`userllm.kernels.compile_check`
does for the Triton kernels, for the nvcc-built op.

The .cu is compiled as CMakeLists.txt compiles it (``-O3 --expt-relaxed-constexpr``, C++20, torch's
headers), to one fatbin with SASS for both architectures (the front end parses torch's headers once);
``cuobjdump -xelf`` splits it into one cubin per architecture and ``cuobjdump -res-usage`` / ``-sass`` give,
per kernel instantiation, the registers, the stack/local memory (spills) and the global-memory opcodes.
A CPU-only torch lacks one generated header of its CUDA build (``c10/cuda/impl/cuda_cmake_macros.h``, a
single ``#define``); the check supplies it in a temporary include directory, changing nothing else.

What it asserts (``problems``): every instantiation compiles without spills; in the vectorised ones
(``VEC`` > 1, taken when the layout is 16-byte aligned) every output store is ``STG.E.128`` and the table
rows (forward) / gradient rows (backward) are read with ``LDG.E.128``, and on sm_90 the float backward
adds with 16-byte vector atomics (``REDG.E.ADD.F32x4``); the scalar fallbacks (``VEC`` = 1) exist for the
other layouts and make no 128-bit access. What it cannot prove: that the code is correct or fast on a GPU
(tests/kernels/test_native_cuda.py and benchmarks/gpu_check.sh do that on one).

    python -m userllm.kernels.cuda_check                     # sm_80 and sm_90; ~20-40 CPU-s
    python -m userllm.kernels.cuda_check --arch 90 --json report.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from .compile_check import CompileResult, _triton_tool, count_opcodes, format_table

SOURCE = Path(__file__).resolve().parent / "csrc" / "embedding_concat_cuda.cu"
# The CUDA flags of CMakeLists.txt's target (target_compile_options / CUDA_STANDARD), which this check mirrors.
NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "-std=c++20", "-DUSERLLM_WITH_CUDA")
_MISSING_HEADER = "c10/cuda/impl/cuda_cmake_macros.h"


class ToolchainMissing(RuntimeError):
    """No nvcc (or no cuobjdump) on this machine."""


def find_nvcc() -> str | None:
    """$CUDACXX, $CUDA_HOME/bin/nvcc, nvcc on PATH, /usr/local/cuda/bin/nvcc, the newest /usr/local/cuda-*/bin/nvcc."""
    candidates = [os.environ.get("CUDACXX"),
                  os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None,
                  shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", path.split("cuda-")[-1]))
    candidates += sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), key=version, reverse=True)
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def find_cuobjdump(nvcc: str | None) -> str | None:
    """cuobjdump beside nvcc, else the one in Triton's bundle."""
    if nvcc:
        beside = os.path.join(os.path.dirname(nvcc), "cuobjdump")
        if os.access(beside, os.X_OK):
            return beside
    try:
        return _triton_tool("cuobjdump")
    except ImportError:
        return shutil.which("cuobjdump")


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else names


def _short(demangled: str) -> tuple[str, str]:
    """'void userllm::(anonymous namespace)::forward_kernel<float, 4>(...)' -> ('forward_kernel', 'float VEC=4')."""
    m = re.search(r"(\w+_kernel)<([^>]*(?:<[^>]*>)?[^>]*)>", demangled)
    if not m:
        return demangled, ""
    args = [a.strip().replace("c10::", "") for a in m.group(2).split(",")]
    return m.group(1), f"{args[0]} VEC={args[1]}" if len(args) > 1 else args[0]


def _per_function(text: str, header: str) -> dict[str, list[str]]:
    """Split cuobjdump output into mangled function name -> its lines."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(header, line)
        if m:
            current = m.group(1)
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return out


def compile_fatbin(archs: tuple[int, ...], workdir: Path, nvcc: str) -> tuple[Path, float]:
    """nvcc the .cu to ``workdir/embedding_concat_cuda.fatbin`` with SASS for each arch; returns (path, seconds)."""
    import torch

    torch_dir = Path(torch.__file__).resolve().parent
    includes = [torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include"]
    if not (includes[0] / _MISSING_HEADER).is_file():  # CPU-only torch: see the module docstring
        shim = workdir / "shim"
        (shim / _MISSING_HEADER).parent.mkdir(parents=True, exist_ok=True)
        (shim / _MISSING_HEADER).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(0, shim)
    out = workdir / "embedding_concat_cuda.fatbin"
    cmd = [nvcc, "-fatbin", *NVCC_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs), *(f"-I{i}" for i in includes),
           "-o", str(out), str(SOURCE)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return out, time.perf_counter() - start


def check(archs: tuple[int, ...] = (80, 90)) -> list[CompileResult]:
    """Compile the .cu for ``archs`` and describe every kernel instantiation of each (see the module docstring)."""
    nvcc = find_nvcc()
    cuobjdump = find_cuobjdump(nvcc)
    if nvcc is None or cuobjdump is None:
        raise ToolchainMissing(f"needs nvcc and cuobjdump (found nvcc: {nvcc}, cuobjdump: {cuobjdump})")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        fatbin, seconds = compile_fatbin(archs, workdir, nvcc)
        subprocess.run([cuobjdump, "-xelf", "all", str(fatbin)], cwd=workdir, capture_output=True, check=True)
        for arch in archs:
            cubins = sorted(workdir.glob(f"*.sm_{arch}.cubin"))
            if not cubins:
                raise RuntimeError(f"cuobjdump found no sm_{arch} code in {fatbin.name}")
            run = lambda flag: subprocess.run([cuobjdump, flag, str(cubins[0])], capture_output=True, text=True,
                                              check=True).stdout  # noqa: E731
            usage = _per_function(run("-res-usage"), r"Function (\S+):")
            sass = _per_function(run("-sass"), r"Function : (\S+)")
            names = sorted(sass)
            for mangled, demangled in zip(names, _demangle(names)):
                kernel, config = _short(demangled)
                r = CompileResult(kernel, config, f"sm_{arch}", workloads=["embedding_concat_cuda.cu"], ok=True,
                                  seconds=seconds)
                fields = dict(item.split(":", 1) for line in usage.get(mangled, []) for item in line.split()
                              if re.fullmatch(r"[A-Z]+:\d+", item))
                r.registers = int(fields["REG"]) if "REG" in fields else None
                r.local_bytes = int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0))
                r.shared_bytes = int(fields.get("SHARED", 0))
                r.sass = count_opcodes(sass[mangled])
                results.append(r)
    return results


def _vec(r: CompileResult) -> int:
    m = re.search(r"VEC=(\d+)", r.config)
    return int(m.group(1)) if m else 1


def problems(results: list[CompileResult], archs: tuple[int, ...]) -> list[str]:
    """What the SASS must show (module docstring); empty when everything holds."""
    found = []
    for arch in archs:
        mine = [r for r in results if r.arch == f"sm_{arch}"]
        for kernel in ("forward_kernel", "backward_kernel"):
            inst = [r for r in mine if r.kernel == kernel]
            if not any(_vec(r) > 1 for r in inst) or not any(_vec(r) == 1 for r in inst):
                found.append(f"sm_{arch} {kernel}: needs vectorised and scalar instantiations, got "
                             f"{[r.config for r in inst]}")
    for r in results:
        where = f"{r.arch} {r.kernel} {r.config}"
        if r.local_bytes:
            found.append(f"{where}: {r.local_bytes} bytes of stack/local memory (spills)")
        wide_loads = sum(n for op, n in r.sass.items() if op.startswith("LDG") and "128" in op.split("."))
        stores = {op: n for op, n in r.sass.items() if op.startswith("STG")}
        if _vec(r) > 1:
            if not wide_loads:
                found.append(f"{where}: no 128-bit row loads (LDG.E.128): {r.sass}")
            if r.kernel == "forward_kernel" and set(stores) != {"STG.E.128"}:
                found.append(f"{where}: output stores are not all STG.E.128: {stores}")
            vector_red = any(op.startswith("RED") and "F32x4" in op for op in r.sass)
            if r.kernel == "backward_kernel" and r.arch == "sm_90" and "double" not in r.config and not vector_red:
                found.append(f"{where}: no 16-byte vector atomics (RED*.ADD.F32x4) on sm_90: {r.sass}")
        elif wide_loads or any("128" in op.split(".") for op in stores):
            found.append(f"{where}: the scalar fallback has 128-bit accesses (it must not assume alignment)")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m userllm.kernels.cuda_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (80, 90); repeatable")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or (80, 90))
    try:
        results = check(archs)
    except ToolchainMissing as exc:
        print(f"cuda_check: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"cuda_check: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        print(str(exc), file=sys.stderr)
        return 1
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    found = problems(results, archs)
    print(f"\n{len(results)} kernel instantiations for {', '.join(f'sm_{a}' for a in archs)}; "
          f"{len(found)} problem(s)")
    for line in found:
        print(f"  {line}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
