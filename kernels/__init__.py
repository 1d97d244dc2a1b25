"""Fused ops of userllm, imported as ``userllm.kernels``.

Public API (signatures fixed; see :mod:`userllm.kernels.reference` for the specification):
``embedding_concat``, ``latent_cross_attention``, ``cached_cross_attention``, the backend switch
``use_backend`` / ``get_backend`` (environment: ``USERLLM_KERNEL_BACKEND``; see
:mod:`userllm.kernels.dispatch`) and ``select_backend(fused, device)``, the run-level choice the
command line makes. The Triton ops live in ``ops/`` (one file per op over the shared ``ops/attention.py``)
and are imported on first use; the native C++/CUDA op is loaded by ``native.py``.
"""

if __name__ == "userllm.kernels":
    from .dispatch import (cached_cross_attention, embedding_concat, get_backend, latent_cross_attention,
                           select_backend, use_backend)

    __all__ = ["embedding_concat", "latent_cross_attention", "cached_cross_attention", "use_backend", "get_backend",
               "select_backend"]
else:
    # Imported under another name, almost always as top-level ``kernels`` because the repository root is
    # on sys.path (``PYTHONPATH=.``, ``python -m pytest``): ``import transformers`` probes for Hugging Face's
    # ``kernels`` package with ``importlib.import_module("kernels")`` and lands here. Stay inert: loading
    # the ops a second time under this name would register the ``torch.library`` ops twice.
    __all__ = []
