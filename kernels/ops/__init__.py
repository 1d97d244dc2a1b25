"""The Triton ops, one file per op (``embedding_concat.py``, ``latent_cross_attention.py``,
``cached_cross_attention.py``; tests ``tests/kernels/test_<op>.py``) over one shared attention module
(``attention.py``: kernels, launchers, checks, registration helper).

They live in this subpackage, not beside :mod:`userllm.kernels.dispatch`, because a submodule named like
the public op would replace the op as an attribute of ``userllm.kernels`` once imported. Nothing is
imported here: importing :mod:`userllm.kernels` never imports Triton; :mod:`userllm.kernels.dispatch`
imports an op module on its first use.
"""
