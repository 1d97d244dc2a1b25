"""The names the command lines choose from, in a module that imports nothing: ``userllm.config`` reads
them without loading transformers and peft (~10 CPU-s, which ``python -m userllm.pretrain`` never needs)."""

INTEGRATIONS = ("xattn", "softprompt")
STRATEGIES = ("full", "lora", "enc", "proj")
