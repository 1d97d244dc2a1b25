"""Training strategies: which parameters of a :class:`~userllm.integration.model.UserLLM` (or of the
:class:`~userllm.integration.baseline.TextPromptModel`, which has only ``llm``: full or lora) train.

    full : everything (LLM, encoder, projection/integration layers)
    lora : LoRA adapters on the LLM's decoder-layer linear maps + encoder + projection/integration;
           the base LLM weights are frozen
    enc  : LLM frozen; encoder + projection/integration train
    proj : only the projection/integration layers train (projection, Perceiver, xattn blocks, soft prompt)

Parameter groups are the UserLLM's top-level submodules: ``llm``, ``encoder`` and the integration
group ``projection``, ``perceiver``, ``xattn``, ``soft_prompt``.

The encoder's pretraining-only parts (the autoregressive encoder's next-event heads ``head_proj`` /
``head_bias``, the dual encoder's label tower ``label_mlp``) are never trainable here: the UserLLM's
forward does not use them, so they would get no gradient (and DistributedDataParallel would need
``find_unused_parameters``). An encoder may name its own with a ``pretraining_only`` attribute.
"""

from __future__ import annotations

from collections import defaultdict

from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from .layers import find_decoder_layers

STRATEGIES = ("full", "lora", "enc", "proj")
INTEGRATION_GROUPS = ("projection", "perceiver", "xattn", "soft_prompt")
# Encoder submodules used only by the pretraining loss (AutoregressiveEncoder / DualEncoder).
PRETRAINING_ONLY = ("head_proj", "head_bias", "label_mlp")


def pretraining_only(name: str, encoder: nn.Module) -> bool:
    """Whether encoder parameter ``name`` belongs to a pretraining-only submodule (see the module docstring)."""
    return name.split(".", 1)[0] in getattr(encoder, "pretraining_only", PRETRAINING_ONLY)


def lora_target_modules(llm: nn.Module) -> tuple[list[str], bool]:
    """Full names of the ``nn.Linear`` / GPT-2 ``Conv1D`` maps inside the decoder layers (attention and MLP),
    found by structure, and whether they are Conv1D (peft then needs ``fan_in_fan_out``). Layers already
    wrapped by LoRA are reported under their own name, the adapters' internals are skipped."""
    path, layers = find_decoder_layers(llm)
    names, conv1d = [], False
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            parts = name.split(".")
            if not name or not isinstance(module, (nn.Linear, Conv1D)) or any(q.startswith("lora_") for q in parts):
                continue
            if parts[-1] == "base_layer":            # already wrapped by peft: name the wrapped layer
                name = name[: -len(".base_layer")]
            names.append(f"{path}.{i}.{name}" if path else f"{i}.{name}")
            conv1d |= isinstance(module, Conv1D)
    if not names:
        raise ValueError(f"no linear layers found in the decoder layers of {type(llm).__name__}")
    return names, conv1d


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.llm.named_parameters())


def apply_strategy(model: nn.Module, strategy: str, lora_r: int = 8, lora_alpha: int = 16,
                   lora_dropout: float = 0.05) -> nn.Module:
    """Set ``requires_grad`` on ``model`` (a UserLLM or a TextPromptModel) for ``strategy``; ``lora`` first
    injects adapters into ``model.llm`` in place (module tree otherwise unchanged). Returns ``model``.
    Raises ValueError for an unknown strategy, or one that needs the user side on a model without it."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    encoder = getattr(model, "encoder", None)
    if encoder is None and strategy not in ("full", "lora"):
        raise ValueError(f"strategy {strategy!r} trains the user side, which {type(model).__name__} does not have")
    if strategy == "lora" and not has_lora(model):
        targets, conv1d = lora_target_modules(model.llm)
        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                            fan_in_fan_out=conv1d, bias="none")
        inject_adapter_in_model(config, model.llm)
    train_llm = strategy == "full"
    train_encoder = strategy in ("full", "lora", "enc")
    for name, p in model.llm.named_parameters():
        p.requires_grad_(train_llm or (strategy == "lora" and "lora_" in name))
    if encoder is not None:
        for name, p in encoder.named_parameters():
            p.requires_grad_(train_encoder and not pretraining_only(name, encoder))
    for group in INTEGRATION_GROUPS:
        module = getattr(model, group, None)
        if module is not None:
            for p in module.parameters():
                p.requires_grad_(True)
    return model


def parameter_groups(model: nn.Module) -> dict[str, dict[str, int]]:
    """{group: {"trainable": n, "total": n}} counted in elements; ``llm.lora`` separates the adapters."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"trainable": 0, "total": 0})
    for name, p in model.named_parameters():
        group = name.split(".", 1)[0]
        if group == "llm" and "lora_" in name:
            group = "llm.lora"
        counts[group]["total"] += p.numel()
        counts[group]["trainable"] += p.numel() if p.requires_grad else 0
    return dict(counts)
