"""Training strategies: which parameters of a :class:`~userllm.integration.model.UserLLM` (or of the
:class:`~userllm.integration.baseline.TextPromptModel`, which has only ``llm``: full or lora) train.

    full : everything (LLM, encoder, projection/integration layers)
    lora : LoRA adapters on the LLM's decoder-layer linear maps (and fused MoE expert weights) + encoder +
           projection/integration;
           the base LLM weights are frozen
    enc  : LLM frozen; encoder + projection/integration train
    proj : only the projection/integration layers train (projection, Perceiver, xattn blocks, soft prompt)

Parameter groups are the UserLLM's top-level submodules: ``llm``, ``encoder`` and the integration
group ``projection``, ``perceiver``, ``xattn``, ``soft_prompt``, ``readout``.

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
from .names import STRATEGIES

INTEGRATION_GROUPS = ("projection", "perceiver", "xattn", "soft_prompt", "readout")
# Encoder submodules used only by the pretraining loss (AutoregressiveEncoder / DualEncoder).
PRETRAINING_ONLY = ("head_proj", "head_bias", "label_mlp")


def pretraining_only(name: str, encoder: nn.Module) -> bool:
    """Whether encoder parameter ``name`` belongs to a pretraining-only submodule (see the module docstring)."""
    return name.split(".", 1)[0] in getattr(encoder, "pretraining_only", PRETRAINING_ONLY)


def _fused_kernel_maps(layer: nn.Module) -> set[str]:
    """Names (within ``layer``) of the ``out_proj`` of Mamba-style mixers (a module with an ``nn.Conv1d``
    child): their fused scan kernel reads ``out_proj.weight`` directly, bypassing a LoRA wrapper, which is
    why peft refuses them for Mamba models (``peft.tuners.tuners_utils``)."""
    out = set()
    for name, module in layer.named_modules():
        children = dict(module.named_children())
        if "out_proj" in children and any(isinstance(c, nn.Conv1d) for c in children.values()):
            out.add(f"{name}.out_proj" if name else "out_proj")
    return out


def _decoder_names(llm: nn.Module):
    """(layer index, name inside the layer, module) for every submodule of the decoder layers, and a
    function giving a name's full path; peft's ``base_layer`` wrappers are named as the layer they wrap."""
    path, layers = find_decoder_layers(llm)

    def full(i: int, name: str) -> str:
        name = name.replace(".base_layer", "")
        return f"{path}.{i}.{name}" if path else f"{i}.{name}"

    return layers, full


def _is_adapter(name: str) -> bool:
    return any(q.startswith("lora_") for q in name.split("."))


def lora_target_modules(llm: nn.Module) -> tuple[list[str], bool]:
    """Full names of the ``nn.Linear`` / GPT-2 ``Conv1D`` maps inside the decoder layers (attention and MLP),
    found by structure, and whether they are Conv1D (peft then needs ``fan_in_fan_out``). Layers already
    wrapped by LoRA are reported under their own name, the adapters' internals are skipped, and so is the
    ``out_proj`` of Mamba mixers (:func:`_fused_kernel_maps`)."""
    layers, full = _decoder_names(llm)
    names, conv1d = [], False
    for i, layer in enumerate(layers):
        skip = _fused_kernel_maps(layer)
        for name, module in layer.named_modules():
            if not name or not isinstance(module, (nn.Linear, Conv1D)) or _is_adapter(name):
                continue
            if name.endswith(".base_layer"):
                name = name[: -len(".base_layer")]
            if name in skip:
                continue
            names.append(full(i, name))
            conv1d |= isinstance(module, Conv1D)
    if not names:
        raise ValueError(f"no linear layers found in the decoder layers of {type(llm).__name__}")
    return names, conv1d


def lora_target_parameters(llm: nn.Module) -> list[str]:
    """Full names of the fused expert weights of transformers-5 MoE blocks inside the decoder layers: 3-D
    parameters [experts, out, in] (Mixtral, Qwen2-MoE, Jamba: ``experts.gate_up_proj``, ``experts.down_proj``),
    which no ``nn.Linear`` holds; peft adapts them per expert as ``target_parameters``."""
    layers, full = _decoder_names(llm)
    out = []
    for i, layer in enumerate(layers):
        for name, p in layer.named_parameters():
            owner = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            # a Conv1d kernel is 3-D too (Mamba's depthwise conv); not an expert bank
            if p.ndim == 3 and not _is_adapter(name) and not isinstance(owner, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                out.append(full(i, name))
    return out


def inject_lora(llm: nn.Module, r: int, alpha: int, dropout: float) -> None:
    """Inject LoRA adapters (rank ``r``, ``dropout`` on their input; none when the model has fused experts)
    into ``llm`` in place: every decoder-layer linear map and fused expert weight (:func:`lora_target_modules`,
    :func:`lora_target_parameters`); module tree otherwise unchanged."""
    targets, conv1d = lora_target_modules(llm)
    experts = lora_target_parameters(llm)
    # peft's parameter adapters (ParamWrapper) refuse dropout and LoraConfig has one rate for all adapters:
    # a model with fused experts trains its LoRA without dropout.
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0 if experts else dropout, target_modules=targets,
                        target_parameters=experts or None, fan_in_fan_out=conv1d, bias="none")
    inject_adapter_in_model(config, llm)


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.llm.named_parameters())


def apply_strategy(model: nn.Module, strategy: str, lora_r: int = 8, lora_alpha: int = 16,
                   lora_dropout: float = 0.05, freeze_encoder: bool = False) -> nn.Module:
    """Set ``requires_grad`` on ``model`` (a UserLLM or a TextPromptModel) for ``strategy``; ``lora`` first
    injects adapters into ``model.llm`` in place (module tree otherwise unchanged). ``freeze_encoder``: the
    encoder stays as it is under any strategy (``full``/``lora`` then train the LLM side only). Returns ``model``.
    Raises ValueError for an unknown strategy, or one that needs the user side on a model without it."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    encoder = getattr(model, "encoder", None)
    if encoder is None and strategy not in ("full", "lora"):
        raise ValueError(f"strategy {strategy!r} trains the user side, which {type(model).__name__} does not have")
    if strategy == "lora" and not has_lora(model):
        inject_lora(model.llm, lora_r, lora_alpha, lora_dropout)
    train_llm = strategy == "full"
    train_encoder = strategy in ("full", "lora", "enc") and not freeze_encoder
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
