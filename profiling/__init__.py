"""Profiling of User-LLM against text-prompt runs, imported as ``userllm.profiling``."""
