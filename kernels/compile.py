"""``--compile``: torch.compile of the model blocks that call the fused ops, with the ops traced.

:func:`compile_model` compiles, in place (``nn.Module.compile``), every block of a User-LLM model that
calls a :mod:`userllm.kernels` op, each with ``fullgraph=True``:

* the gated cross-attention blocks (``cached_cross_attention``), run at every training step and at every
  decoding step (prefill and one-token steps: ``dynamic=None`` lets Dynamo mark the text length dynamic
  after the first shape change instead of recompiling per length),
* the Perceiver layers (``latent_cross_attention``),
* the encoder's event embedding (``embedding_concat``).

``fullgraph=True`` makes a graph break an error instead of a silent fallback: the fused ops are
``torch.library`` custom ops with fake implementations (Triton, native), or traceable PyTorch (the
reference and the SDPA path), so the whole block is one graph and Inductor fuses the norms, projections,
gates and residuals around the op. The LLM itself (a Hugging Face model whose decoder layers carry the
cross-attention hooks) stays eager: its generation loop and cache objects are what Dynamo handles worst,
and its matmuls gain little from Inductor on CPU.

The backend choice of :mod:`userllm.kernels.dispatch` is read while tracing: set it
(:func:`userllm.kernels.select_backend`) before the first step.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["compile_model", "compiled_block_types", "is_compiled"]


def compiled_block_types() -> tuple[type, ...]:
    """The module classes :func:`compile_model` compiles (imported here, on call: the model layers import
    :mod:`userllm.kernels`, so a module-level import would make a circle)."""
    from ..encoders.transformer import EventEmbedding
    from ..integration.cross_attention import GatedCrossAttentionBlock
    from ..integration.perceiver import PerceiverLayer
    return GatedCrossAttentionBlock, PerceiverLayer, EventEmbedding


def compile_model(model: nn.Module, *, backend: str = "inductor", mode: str | None = None,
                  dynamic: bool | None = None) -> list[str]:
    """Compile (in place, ``fullgraph=True``) every block of ``model`` that calls a fused op; returns their
    qualified names, outermost first (a block inside a compiled one is not compiled again). A model
    without such a block (the TextPrompt baseline) is left as it is and gives an empty list.
    """
    types = compiled_block_types()
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, types) and not any(name.startswith(f"{done}.") for done in names):
            module.compile(fullgraph=True, backend=backend, mode=mode, dynamic=dynamic)
            names.append(name)
    return names


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` was compiled by :func:`compile_model` (``nn.Module.compile`` in place)."""
    return getattr(module, "_compiled_call_impl", None) is not None

