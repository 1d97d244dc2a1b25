"""userllm: User-LLM (Ning et al., arXiv 2402.13598) with fused kernels.

Subpackages: ``data`` (readers, synthetic data, sequences and tasks), ``encoders`` (user encoders),
``integration`` (UserLLM: cross-attention / soft prompt / Perceiver), ``kernels`` (fused ops, a link
to the top-level ``kernels/``) and ``profiling`` (a link to the top-level ``profiling/``).
"""

__version__ = "0.1.0"
