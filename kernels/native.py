"""Native (C++/CUDA) ops: loader of the ``userllm_native`` torch op library and its Python-facing ops.

The library (``kernels/csrc/``, built by ``CMakeLists.txt``) is a plain shared object registering ops with
``TORCH_LIBRARY(userllm_native, ...)``; it is loaded with ``torch.ops.load_library`` (no Python extension
module). This module adds what torch needs on top: autograd (``register_autograd``, calling the native
backward op) and fake implementations (``register_fake``) so that ``torch.compile`` can trace the op.

Ops:
    embedding_concat(ids, tables, pooling="mean") -> Tensor[B, L, sum(D_i)]
        Same contract as :func:`userllm.kernels.reference.embedding_concat`: ids int32/int64 [B, L] or
        [B, L, K] (negative = padding), tables [V_i, D_i] fp32/bf16/fp16; differentiable w.r.t. tables.
        CPU kernels always; CUDA kernels when the library was built with CUDA (see ``available``).

Build, skip, rebuild:
    pip install --no-build-isolation -e .        builds with CMake and copies the library to
                                                 kernels/_C.<tag>.so (setup.py; ninja if installed)
    cmake -S . -B build && cmake --build build   plain checkout: build/_C.so
    USERLLM_SKIP_NATIVE=1 pip install ...        no native build; at run time it also skips loading
    rebuild: rerun the same command (pip reinstall, or ``cmake --build build``); after a torch upgrade
    the library must be rebuilt (it links against torch's C++ ABI): one that no longer loads is skipped,
    and named in the warning when nothing else loads.

Where the library is looked for:
    1. ``$USERLLM_NATIVE_LIB`` (a path to the .so) when set, and nothing else;
    2. otherwise ``_C*.so`` next to this file (wheel or editable install: setup.py copies it there) and
       ``<checkout>/build/_C.so`` (the plain CMake build above), the most recently built first, so that
       in a checkout whichever build ran last is used; a file that fails to load is skipped.
When none loads, ``available()`` is False, a single warning says why, and :mod:`userllm.kernels`
keeps using Triton / the reference implementation. ``library_path()`` tells which file was loaded.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Sequence

import torch

from .reference import check_embedding_inputs

__all__ = ["available", "embedding_concat", "library_path", "load"]

NAMESPACE = "userllm_native"
_HERE = Path(__file__).parent

_lock = threading.Lock()
_loaded = False       # a load was attempted
_path: Path | None = None
_devices: frozenset[str] = frozenset()  # device types with kernels: {"cpu"} or {"cpu", "cuda"}
_warned = False


def _candidates() -> list[Path]:
    """Library files in search order (see the module docstring)."""
    env = os.environ.get("USERLLM_NATIVE_LIB")
    if env:
        return [Path(env)]
    found: list[Path] = []
    # The package directory as imported (userllm/kernels) and as stored (kernels/ behind the symlink).
    for d in dict.fromkeys([_HERE, _HERE.resolve()]):
        found += d.glob("_C*.so")
    checkout = _HERE.resolve().parent
    if (checkout / "CMakeLists.txt").is_file():
        found.append(checkout / "build" / "_C.so")
    found = [p for p in dict.fromkeys(p.resolve() for p in found) if p.is_file()]
    # Newest first: in a checkout with both an installed copy and a plain CMake build, the last build wins.
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _warn(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"userllm native ops unavailable: {message}. embedding_concat falls back to Triton / the "
                      "PyTorch reference. Build them with `pip install --no-build-isolation -e .` or "
                      "`cmake -S . -B build && cmake --build build`.", RuntimeWarning, stacklevel=5)


def _has_kernel(dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::embedding_concat", dispatch_key)
    except RuntimeError:  # the op is not defined: no library loaded
        return False


def load() -> bool:
    """Find and load the library once (thread-safe); returns whether its ops are usable."""
    global _loaded
    if not _loaded:
        with _lock:
            if not _loaded:
                try:
                    _load()
                finally:
                    _loaded = True  # only once the attempt is over: other threads wait on the lock meanwhile
    return bool(_devices)


def _load() -> None:
    global _path, _devices
    if os.environ.get("USERLLM_SKIP_NATIVE", "").strip().lower() in ("1", "true", "yes", "on"):
        return  # the user asked for no native ops: no warning
    errors = []
    for path in _candidates():
        if not path.is_file():
            errors.append(f"{path}: not found")
            continue
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as exc:  # e.g. built against another torch
            errors.append(f"{path}: {exc}")
            continue
        _path = path
        break
    if not _has_kernel("CPU"):
        tried = "; ".join(errors or [f"no _C*.so in {_HERE} or in the checkout's build/"])
        _warn(f"no library loaded ({tried})")
        return
    _register_python_parts()
    _devices = frozenset(d for d in ("cpu", "cuda") if _has_kernel(d.upper()))


def available(device: str | torch.device | None = None) -> bool:
    """Whether the native ops are loaded; with ``device``, whether they have kernels for its type.

    The first call loads the library (and warns once if it cannot).
    """
    if not load():
        return False
    return device is None or torch.device(device).type in _devices


def library_path() -> Path | None:
    """The loaded library file (None when not loaded, or loaded by someone else)."""
    load()
    return _path


def _register_python_parts() -> None:
    """Fake (meta) implementations and autograd for the C++ ops."""
    lib = f"{NAMESPACE}::"

    @torch.library.register_fake(lib + "embedding_concat")
    def _(ids, tables, pooling):
        torch._check(len(ids) == len(tables) and len(ids) > 0)
        lead = ids[0].shape[:2]
        return tables[0].new_empty((*lead, sum(t.shape[1] for t in tables)))

    @torch.library.register_fake(lib + "embedding_concat_backward")
    def _(grad_out, ids, num_rows, dims, pooling):
        return [grad_out.new_empty((v, d)) for v, d in zip(num_rows, dims)]

    def setup_context(ctx, inputs, output):
        ids, tables, pooling = inputs
        ctx.save_for_backward(*ids)
        ctx.num_ids = len(ids)
        ctx.num_rows = [t.shape[0] for t in tables]
        ctx.dims = [t.shape[1] for t in tables]
        ctx.pooling = pooling

    def backward(ctx, grad):
        grads = torch.ops.userllm_native.embedding_concat_backward(
            grad, list(ctx.saved_tensors), ctx.num_rows, ctx.dims, ctx.pooling)
        # One entry per input, lists mirroring the Tensor[] arguments (ids get no gradient).
        return [None] * ctx.num_ids, list(grads), None

    torch.library.register_autograd(lib + "embedding_concat", backward, setup_context=setup_context)


def embedding_concat(ids: Sequence[torch.Tensor], tables: Sequence[torch.Tensor], pooling: str = "mean"
                     ) -> torch.Tensor:
    """Native ``embedding_concat``: ids int32/int64 [B, L] or [B, L, K] (negative = padding), tables
    [V_i, D_i] of one float dtype -> [B, L, sum(D_i)] in that dtype; differentiable w.r.t. tables.

    Raises RuntimeError when the library (or its kernels for the tables' device) is not available: callers
    check :func:`available` first. Inputs are validated by the reference's ``check_embedding_inputs`` in
    eager mode (same errors as every backend). On CPU the id range test is left to the kernel, which tests
    every id as it reads it and raises the same IndexError naming the feature (also under
    ``torch.compile``); that saves a max per feature, ~10% of the op on the benchmark's shape.
    """
    if not torch.compiler.is_compiling():
        check_embedding_inputs(ids, tables, pooling, values=tables[0].device.type != "cpu")
        if not available(tables[0].device):
            raise RuntimeError(f"userllm native embedding_concat has no kernel for {tables[0].device} "
                               f"(library: {_path or 'not loaded'}, kernels for: {sorted(_devices) or 'none'})")
    return torch.ops.userllm_native.embedding_concat(list(ids), list(tables), pooling)
