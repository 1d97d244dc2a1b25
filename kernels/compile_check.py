"""Compile every Triton kernel for a real GPU architecture, on a machine without a GPU.

The Triton interpreter (``TRITON_INTERPRET=1``, how the kernels are tested on CPU) accepts programs that
the GPU compiler rejects: a ``tl.dot`` tile smaller than 16, a block that is not a power of two, a
scan combine function the lowering does not support. This module closes that gap without a GPU. It
runs the real launchers (:mod:`userllm.kernels.ops.embedding_concat`, :mod:`userllm.kernels.ops.attention`) on
``meta`` tensors with the kernels swapped for recorders, so it sees exactly the grids, arguments and
block sizes that a CUDA call at those shapes would launch. Then it compiles each distinct launch
ahead of time through Triton's own pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin, with the ``ptxas``
that ships with Triton) for the target architecture, and reads the cubin's resource usage (registers,
spilled local memory, shared memory) with the ``cuobjdump`` that ships with Triton too.

What it proves: the kernels compile for the architecture at the shapes of the issue and of the model,
how many registers they take, whether they spill, and whether their memory accesses are 16 bytes wide. What it cannot prove: that the compiled code
computes the right numbers or runs fast. That needs a GPU (``benchmarks/gpu_check.sh``).

    python -m userllm.kernels.compile_check                  # sm_80 and sm_90, all workloads
    python -m userllm.kernels.compile_check --arch 90 --json report.json

Run it without ``TRITON_INTERPRET`` (the interpreter replaces the kernels by Python functions).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch

from .env import interpreter_requested

_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
                 torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


@dataclass
class Launch:
    """One kernel launch as the launcher made it: the kernel, its grid, arguments and compile options."""
    kernel: object                      # the triton JITFunction
    grid: tuple
    args: dict                          # parameter name -> value (tensors, ints, floats, constexprs)
    options: dict                       # num_warps, num_stages, ...

    def signature(self) -> tuple[dict, dict, dict]:
        """(signature, constexprs, attrs) the way Triton's JIT specializes a launch: pointers and ints
        divisible by 16 get the divisibility hint, ints equal to 1 become constants. Tensors are assumed
        16-byte aligned (true of every fresh CUDA allocation, which is what the launchers pass). Checked
        against Triton's own launcher by :func:`specialization_mismatch` where its internals allow."""
        signature, constexprs, attrs = {}, {}, {}
        for index, param in enumerate(self.kernel.params):
            name, value = param.name, self.args[param.name]
            if param.is_constexpr:
                signature[name], constexprs[(index,)] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + _TRITON_TYPES[value.dtype]
                attrs[(index,)] = [["tt.divisibility", 16]]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                if value == 1 and not param.do_not_specialize:
                    signature[name], constexprs[(index,)] = "constexpr", 1
                    continue
                signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
                if value % 16 == 0 and not param.do_not_specialize:
                    attrs[(index,)] = [["tt.divisibility", 16]]
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise TypeError(f"{self.kernel.__name__}: cannot type argument {name}={value!r}")
        return signature, constexprs, attrs

    def key(self) -> str:
        """Identity of the compiled binary: kernel name, types, constants and options."""
        signature, constexprs, attrs = self.signature()
        consts = {self.kernel.params[path[0]].name: value for path, value in constexprs.items()}
        return json.dumps([self.kernel.__name__, signature, consts, sorted(map(str, attrs)), self.options],
                          sort_keys=True, default=str)

    def describe(self) -> str:
        _, constexprs, _ = self.signature()
        consts = " ".join(f"{self.kernel.params[p[0]].name}={v}" for p, v in constexprs.items())
        dtypes = sorted({_TRITON_TYPES[v.dtype] for v in self.args.values()
                         if isinstance(v, torch.Tensor) and v.dtype.is_floating_point})
        options = " ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{'/'.join(dtypes)} {consts} {options}"


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, kernel, sink: list[Launch]):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = [p.name for p in self.kernel.params]
            bound = dict(zip(names, args))
            options = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
            bound.update(kwargs)
            missing = [n for n in names if n not in bound]
            if missing:
                raise TypeError(f"{self.kernel.__name__}: launch without {missing}")
            self.sink.append(Launch(self.kernel, tuple(grid), bound, options))
        return launch


@contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Within the block, every Triton kernel of userllm.kernels is recorded instead of launched."""
    if interpreter_requested():
        raise RuntimeError("compile_check needs the compiled kernels: run it without TRITON_INTERPRET")
    from .ops import attention, embedding_concat
    modules = {embedding_concat: ("_emb_fwd_kernel", "_emb_bwd_kernel"),
               attention: ("_attn_fwd_kernel", "_attn_bwd_kernel")}
    sink: list[Launch] = []
    saved = {(m, n): getattr(m, n) for m, names in modules.items() for n in names}
    try:
        for (module, name), kernel in saved.items():
            setattr(module, name, _Recorder(kernel, sink))
        yield sink
    finally:
        for (module, name), kernel in saved.items():
            setattr(module, name, kernel)


# -------------------------------------------------------------------------------------------- workloads

def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _embedding(B: int, L: int, dtype: torch.dtype, specs=((100_000, 64, 1), (10, 8, 1), (20, 32, 8))
               ) -> Callable[[], None]:
    """Features (V, D, ids per event); default: issue 4's item (100k x 64), rating (10 x 8) and genres
    (20 x 32, up to 8 per event)."""
    from .ops.embedding_concat import embedding_concat_backward, embedding_concat_forward

    def run():
        ids = [_meta(B, L, dtype=torch.int64) if k == 1 else _meta(B, L, k, dtype=torch.int64) for _, _, k in specs]
        tables = [_meta(v, d, dtype=dtype) for v, d, _ in specs]
        out = embedding_concat_forward(ids, tables, "mean")
        embedding_concat_backward(torch.empty_like(out), ids, tables, "mean")
    return run


def _attention(B: int, T: int, Hq: int, Hkv: int, N: int, D: int, dtype: torch.dtype, shared_q: bool,
               backward: bool) -> Callable[[], None]:
    from .ops.attention import attention_backward, attention_forward

    def run():
        q = _meta(T, Hq, D, dtype=dtype) if shared_q else _meta(B, T, Hq, D, dtype=dtype)
        k, v = _meta(B, N, Hkv, D, dtype=dtype), _meta(B, N, Hkv, D, dtype=dtype)
        lengths = _meta(B, dtype=torch.int64)
        out, lse = attention_forward(q, k, v, lengths, D ** -0.5)
        if backward:
            attention_backward(torch.empty_like(out), q, k, v, lengths, out, lse, D ** -0.5)
    return run


def workloads() -> dict[str, Callable[[], None]]:
    """Named calls of the launchers: the benchmark shapes of issue 4 and the shapes the model uses
    (Perceiver 50 -> 16 latents, cross-attention in training with T text positions), bf16 and fp32."""
    # odd widths and offsets (no 16-byte alignment to prove) in fp16: must compile too
    out: dict[str, Callable[[], None]] = {"embedding_concat odd layout fp16": _embedding(
        4, 7, torch.float16, specs=((1000, 13, 1), (6, 5, 3)))}
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        out[f"embedding_concat 1M events {tag}"] = _embedding(1024, 1024, dtype)
        for n in (50, 200):
            out[f"latent B=1024 M=16 N={n} H=8 D=64 fwd+bwd {tag}"] = _attention(1024, 16, 8, 8, n, 64, dtype,
                                                                                True, True)
        for n in (16, 50, 200):
            out[f"decode T=1 B=256 Hq=32 Hkv=8 N={n} D=128 {tag}"] = _attention(256, 1, 32, 8, n, 128, dtype,
                                                                               False, False)
        out[f"prefill T=128 Hq=32 Hkv=8 N=50 D=128 fwd+bwd {tag}"] = _attention(8, 128, 32, 8, 50, 128, dtype,
                                                                                False, True)
        out[f"xattn T=64 Hq=Hkv=4 N=16 D=32 fwd+bwd {tag}"] = _attention(8, 64, 4, 4, 16, 32, dtype, False, True)
    return out


# ---------------------------------------------------------------------------------------------- compile

@dataclass
class CompileResult:
    kernel: str
    config: str
    arch: str
    workloads: list[str] = field(default_factory=list)
    ok: bool = False
    error: str = ""
    registers: int | None = None
    local_bytes: int | None = None       # spilled registers / stack (should be 0)
    shared_bytes: int | None = None
    sass: dict[str, int] = field(default_factory=dict)   # global-memory and matrix opcodes -> count
    seconds: float = 0.0

    def memory_summary(self) -> str:
        """e.g. 'ld 4/8x16B st 4/4x16B HMMA': 16-byte global accesses among all, and the matrix unit."""
        def share(prefixes):
            ops = {k: v for k, v in self.sass.items() if k.startswith(prefixes)}
            wide = sum(v for k, v in ops.items() if "128" in k.split("."))  # LDG.E.128, LDG.E.128.CONSTANT
            return f"{wide}/{sum(ops.values())}"
        mma = sorted({k.split(".")[0] for k in self.sass if "MMA" in k}) or ["-"]
        return f"ld {share(('LDG', 'LDGSTS'))}x16B st {share(('STG',))}x16B {'+'.join(mma)}"


def _triton_tool(name: str) -> str | None:
    import triton.backends.nvidia as nvidia
    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", name)
    return path if os.access(path, os.X_OK) else None


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """Output of Triton's bundled ``cuobjdump <flag>`` on the cubin ("" when the tool is missing)."""
    tool = _triton_tool("cuobjdump")
    if tool is None:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=False).stdout


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """{'REG': .., 'LOCAL': .., 'STACK': .., 'SHARED': ..} of the cubin's one function (cuobjdump -res-usage)."""
    text = _cuobjdump(cubin, "-res-usage")
    usage: dict[str, int] = {}
    for line in text.splitlines():
        if "REG:" in line:
            for item in line.split():
                key, _, value = item.partition(":")
                if value.isdigit():
                    usage[key] = int(value)
    return usage


_SASS_OPS = ("LDG", "LDGSTS", "STG", "ATOMG", "RED", "HMMA", "HGMMA")


def _sass_opcodes(cubin: bytes) -> dict[str, int]:
    """Counts of the global-memory and matrix opcodes in the cubin's SASS (cuobjdump -sass): whether loads
    and stores are 16 bytes wide (``LDG.E.128``) or scalar (``STG.E.U16``), and whether dots run on the
    tensor cores (``HMMA``; ``HGMMA`` = Hopper's wgmma) rather than FMA units."""
    return count_opcodes(_cuobjdump(cubin, "-sass").splitlines())


def count_opcodes(sass_lines) -> dict[str, int]:
    """Counts of the global-memory and matrix opcodes (``_SASS_OPS``) in lines of ``cuobjdump -sass`` output."""
    counts: dict[str, int] = {}
    for line in sass_lines:
        # "        /*0150*/     @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;" -> LDG.E.128
        code = line.split("*/", 1)[1].split(";")[0].split() if "*/" in line else []
        if code and code[0].startswith("@"):
            code = code[1:]
        if code and code[0].startswith(_SASS_OPS):
            counts[code[0]] = counts.get(code[0], 0) + 1
    return counts


def compile_launch(launch: Launch, arch: int) -> CompileResult:
    """Compile one recorded launch for ``sm_<arch>`` and read its resource usage."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = CompileResult(launch.kernel.__name__, launch.describe(), f"sm_{arch}")
    signature, constexprs, attrs = launch.signature()
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    except Exception as exc:  # the compiler raises many types; the message is the finding
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return result
    finally:
        result.seconds = time.perf_counter() - start
    result.ok = True
    usage = _resource_usage(compiled.asm["cubin"])
    result.registers = usage.get("REG")
    if usage:
        result.local_bytes = usage.get("LOCAL", 0) + usage.get("STACK", 0)
    result.shared_bytes = usage.get("SHARED", compiled.metadata.shared)
    result.sass = _sass_opcodes(compiled.asm["cubin"])
    return result


def specialization_mismatch(launch: Launch, arch: int) -> str | None:
    """Compare :meth:`Launch.signature` with what Triton's own launcher would specialize (its internal
    binder, called without a GPU). Returns a description of the difference, None when they agree or when
    this Triton version has no such internal API (it is not public, so it may move)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError:
        return None
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", arch, 32)))
    positional = [launch.args[p.name] for p in kernel.params if not p.is_constexpr]
    keywords = {p.name: launch.args[p.name] for p in kernel.params if p.is_constexpr}
    _, specialization, _ = binder(*positional, **keywords, **launch.options)
    signature, constexprs, attrs = launch.signature()
    for index, (param, (kind, spec)) in enumerate(zip(kernel.params, specialization)):
        ours = (signature[param.name], constexprs.get((index,)) if signature[param.name] == "constexpr"
                else ("D" if (index,) in attrs else ""))
        theirs = (kind, spec if kind == "constexpr" else (spec or ""))
        if ours != theirs:
            return f"{kernel.__name__}.{param.name}: ours {ours}, Triton's {theirs}"
    return None


def check(archs: tuple[int, ...] = (80, 90), selected: list[str] | None = None) -> list[CompileResult]:
    """Record the launches of every workload (or those whose name contains one of ``selected``) and
    compile each distinct one for each architecture."""
    distinct: dict[str, tuple[Launch, list[str]]] = {}
    for name, run in workloads().items():
        if selected and not any(s in name for s in selected):
            continue
        with recording_launches() as launches:
            run()
        for launch in launches:
            distinct.setdefault(launch.key(), (launch, []))[1].append(name)
    results = []
    for arch in archs:
        for launch, names in distinct.values():
            mismatch = specialization_mismatch(launch, arch)
            if mismatch:  # compiling it would check another program than the one a launch runs
                result = CompileResult(launch.kernel.__name__, launch.describe(), f"sm_{arch}",
                                       error=f"specialization differs from Triton's launcher: {mismatch}")
            else:
                result = compile_launch(launch, arch)
            result.workloads = sorted(set(names))
            results.append(result)
    return results


def format_table(results: list[CompileResult]) -> str:
    lines = [f"{'arch':6s} {'kernel':17s} {'ok':3s} {'regs':>4s} {'spill':>5s} {'smem':>6s} "
             f"{'global accesses, matrix unit':32s}  config", "-" * 140]
    for r in results:
        lines.append(f"{r.arch:6s} {r.kernel:17s} {'yes' if r.ok else 'NO':3s} {r.registers or '':>4} "
                     f"{'' if r.local_bytes is None else r.local_bytes:>5} {r.shared_bytes or '':>6} "
                     f"{r.memory_summary() if r.sass else '':32s}  {r.config}")
        if r.error:
            lines.append(f"       error: {r.error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m userllm.kernels.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (80, 90); repeatable")
    parser.add_argument("--only", action="append", help="workloads whose name contains this text; repeatable")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    try:
        import triton  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        print(f"compile_check: Triton is not installed ({exc})", file=sys.stderr)
        return 2
    try:
        results = check(tuple(args.arch or (80, 90)), args.only)
    except RuntimeError as exc:
        print(f"compile_check: {exc}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    failed = [r for r in results if not r.ok]
    spilled = [r for r in results if r.local_bytes]
    print(f"\n{len(results) - len(failed)}/{len(results)} compiled; {len(spilled)} spill registers to local memory")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
