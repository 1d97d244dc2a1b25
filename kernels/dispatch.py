"""Backend dispatch of the fused ops: the one switch that picks reference, Triton or native code.

The switch
----------
* environment variable ``USERLLM_KERNEL_BACKEND`` in {``auto``, ``reference``, ``triton``, ``native``,
  ``sdpa``}
  (default ``auto``), read at each call;
* ``use_backend(name)`` overrides it in-process: as a plain call it sets the backend until changed, as a
  context manager (``with use_backend("reference"): ...``) it restores the previous choice on exit.
  ``use_backend(None)`` clears the override (back to the environment variable). ``get_backend()`` returns
  the requested name.

What each name means for an op called with tensors on a device
---------------------------------------------------------------
* ``auto``: CUDA tensors -> Triton (reference when Triton is missing); CPU tensors -> the native C++
  ``embedding_concat`` when its library is built (:mod:`userllm.kernels.native`), else the reference;
  the attention ops through ``F.scaled_dot_product_attention`` (:mod:`userllm.kernels.sdpa`) from
  ``SDPA_MIN_KEYS`` keys up, where it beats the reference forward and backward, and the reference below
  (measurements at ``SDPA_MIN_KEYS``). (The native CUDA
  ``embedding_concat`` is used for CUDA tensors only when forced with ``native``: Triton is the default
  there until benchmarks/RESULTS.md shows the native op faster.)
* ``reference``: the PyTorch specification in :mod:`userllm.kernels.reference`, any device.
* ``triton``: the Triton kernels. CUDA tensors, or CPU tensors when the process runs the Triton
  interpreter (``TRITON_INTERPRET=1`` exported before the kernels are first imported); anything else
  raises ``RuntimeError``.
* ``native``: the native ``embedding_concat``; for the attention ops (no native version) this means
  ``auto``. When the native library is not built, one warning is issued and ``auto`` is used.
* ``sdpa``: the attention ops through SDPA with a boolean key mask, any device; for
  ``embedding_concat`` this means ``auto``.

The Triton modules are imported lazily (on first use), so importing :mod:`userllm.kernels` never
compiles or imports Triton kernels, and ``TRITON_INTERPRET`` can still be set after that import.

Under ``torch.compile`` the choice is made while tracing (the reference is traced and fused by
Inductor; Triton/native ops are opaque ``torch.library`` custom ops). A graph compiled under one
environment value is not re-traced when the variable changes; ``use_backend`` changes are guarded.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Sequence

import torch

from . import reference, sdpa
from .env import ENV_VAR, interpreter_requested

BACKENDS = ("auto", "reference", "triton", "native", "sdpa")

_override: str | None = None
_native_state: dict = {}   # device type -> the native module (None: no kernels there), once probed


def _validate(name: str) -> str:
    key = name.strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return key


def get_backend() -> str:
    """The requested backend name: the ``use_backend`` override, else ``$USERLLM_KERNEL_BACKEND``, else auto."""
    if _override is not None:
        return _override
    return _validate(os.environ.get(ENV_VAR, "auto") or "auto")


class use_backend:
    """Select the kernel backend: ``use_backend("triton")`` sets it; ``with use_backend("reference"):``
    sets it for the block and restores the previous choice afterwards. ``None`` clears the override."""

    def __init__(self, name: str | None):
        global _override
        self.previous = _override
        _override = None if name is None else _validate(name)

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc) -> None:
        global _override
        _override = self.previous


def triton_interpreted() -> bool:
    """Whether the Triton kernels run (or, not yet imported, would run) in the Triton interpreter."""
    for name in ("embedding_concat", "attention"):
        mod = sys.modules.get(f"{__package__}.ops.{name}")
        if mod is not None:
            return mod.INTERPRETED
    return interpreter_requested()


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@torch.compiler.assume_constant_result
def native_available(device_type: str = "cpu") -> bool:
    """Whether the native op library (built by CMake, see kernels/csrc) has kernels for ``device_type``.

    Probed once per device type (the native loader warns once when the library is missing); a constant
    for torch.compile.
    """
    if device_type not in _native_state:
        try:
            from . import native
            _native_state[device_type] = native if native.available(device_type) else None
        except Exception:  # not built, or the helper module itself is absent: fall back cleanly
            _native_state[device_type] = None
    return _native_state[device_type] is not None


def _native_module(device_type: str):
    native_available(device_type)
    return _native_state[device_type]


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


# The CPU attention path of ``auto``: SDPA from this many key positions up, the reference below. Measured
# (benchmarks/test_kernels.py::test_attention_cpu_model_shapes, CPU time, 1 thread, fp32, 2026-12-01): at
# the training cross-attention shape (B=64, T=64, 4/2 heads of 32) SDPA took 0.85x / 0.91x the reference's
# speed (forward / forward+backward) at N=10 keys and 2.67x / 1.75x at N=50; decode (T=1) and Perceiver
# (M=16) at N=50 1.3-2.4x. N in between was not measured: 24 is about the geometric middle.
SDPA_MIN_KEYS = 24


def resolve(op: str, device: torch.device, num_keys: int | None = None) -> str:
    """The concrete backend ("reference", "triton", "native" or "sdpa") that runs ``op`` on ``device`` now;
    ``num_keys`` (N of an attention op) picks between SDPA and the reference on CPU under ``auto``."""
    requested = get_backend()
    if requested == "reference":
        return "reference"
    if requested == "triton":
        if not _triton_importable():
            raise RuntimeError(f"{op}: kernel backend 'triton' was requested but triton is not installed")
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"{op}: kernel backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 exported before the "
                f"Triton kernels are first imported to run them on {device.type} tensors (slowly)")
        return "triton"
    if requested == "sdpa" and op != "embedding_concat":
        return "sdpa"
    if requested == "native" and op == "embedding_concat":
        if native_available(device.type):
            return "native"
        _warn_once("native", f"userllm: the native kernel library has no {device.type} kernels (see "
                             "kernels/native.py to build it); embedding_concat falls back to the automatic backend")
    # auto
    if device.type == "cuda":
        return "triton" if _triton_importable() else "reference"
    if op == "embedding_concat":
        return "native" if native_available(device.type) else "reference"
    return "reference" if num_keys is not None and num_keys < SDPA_MIN_KEYS else "sdpa"


def select_backend(fused: bool, device: torch.device) -> str:
    """Set the backend of a run (``use_backend``) and return a one-line description of the path taken.

    ``fused=False``: the reference ops. ``fused=True``: Triton on CUDA (the reference when Triton is not
    installed), on CPU the native C++ ``embedding_concat`` when its library is built and the attention
    ops through SDPA, else the reference. This is the policy of ``auto``
    made explicit, so that the printed line names what runs. The command-line entry points call it
    (``--fused-kernels``).
    """
    device = torch.device(device)
    if not fused:
        use_backend("reference")
        return "kernels: PyTorch reference ops (pass --fused-kernels for the fused ones)"
    if device.type == "cuda":
        if _triton_importable():
            use_backend("triton")
            return "kernels: fused Triton kernels on CUDA"
        use_backend("reference")
        return "kernels: --fused-kernels asked for Triton, which is not installed; using the PyTorch reference ops"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the line returned says it; no second warning
        native = native_available(device.type)
    if native:
        use_backend("native")
        return (f"kernels: native C++ embedding_concat and SDPA attention on CPU (the reference attention "
                f"below {SDPA_MIN_KEYS} keys)")
    use_backend("sdpa")
    return ("kernels: --fused-kernels: the native CPU library is not built; reference embedding_concat, "
            f"SDPA attention on CPU (the reference below {SDPA_MIN_KEYS} keys)")


# ------------------------------------------------------------------------------------------- public ops

def embedding_concat(ids: Sequence[torch.Tensor], tables: Sequence[torch.Tensor], pooling: str = "mean") -> torch.Tensor:
    """Look up every feature's embedding (mean/sum pooled over several ids) and concatenate per event.

    ids: sequence of int32/int64 [B, L] or [B, L, K] tensors (negative = padding); tables: sequence of
    [V_i, D_i] float tensors of one dtype. Returns [B, L, sum(D_i)]; differentiable w.r.t. tables; an
    id >= V_i raises IndexError naming the feature. See :func:`userllm.kernels.reference.embedding_concat`.
    """
    backend = resolve("embedding_concat", tables[0].device)
    if backend == "triton":
        from .ops.embedding_concat import embedding_concat as impl
    elif backend == "native":
        impl = _native_module(tables[0].device.type).embedding_concat
    else:
        impl = reference.embedding_concat
    return impl(ids, tables, pooling)


def latent_cross_attention(latents: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """Perceiver cross-attention: latents [M, H, D] (shared) or [B, M, H, D] over k, v [B, N, H, D] with
    keys at positions >= kv_lengths[b] masked. Returns [B, M, H, D]. See the reference for details."""
    backend = resolve("latent_cross_attention", latents.device, k.shape[1])
    if backend == "triton":
        from .ops.latent_cross_attention import latent_cross_attention as impl
    elif backend == "sdpa":
        impl = sdpa.latent_cross_attention
    else:
        impl = reference.latent_cross_attention
    return impl(latents, k, v, kv_lengths, scale)


def cached_cross_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lengths: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """Grouped-query attention of q [B, T, Hq, D] over a cache [B, N, Hkv, D] with keys at positions
    >= kv_lengths[b] masked. Returns [B, T, Hq, D]. See the reference for details."""
    backend = resolve("cached_cross_attention", q.device, k_cache.shape[1])
    if backend == "triton":
        from .ops.cached_cross_attention import cached_cross_attention as impl
    elif backend == "sdpa":
        impl = sdpa.cached_cross_attention
    else:
        impl = reference.cached_cross_attention
    return impl(q, k_cache, v_cache, kv_lengths, scale)
