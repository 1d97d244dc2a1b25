"""Profiling of User-LLM against text-prompt runs, imported as ``userllm.profiling``.

Modules (import what you need; nothing heavy is imported here):

* :mod:`.tokens`  LLM input tokens per example (User-LLM vs TextPrompt), ``python -m userllm.profiling.tokens``;
* :mod:`.flops`   analytic (6ND-style + attention) and measured (FlopCounterMode) FLOPs per component;
* :mod:`.gpu`     background NVML sampler (utilisation, memory, power, energy), fake-NVML injectable;
* :mod:`.timing`  CUDA-event / perf_counter timing, peak allocated memory / peak RSS;
* :mod:`.measure` the environment record, timing under the NVML sampler, ``profile_training_step`` and
  ``write_profile`` (shared by compare and ``python -m userllm.train --profile``);
* :mod:`.train_profile` ``TrainProfiler``: the ``profile.json`` of ``python -m userllm.train --profile``;
* :mod:`.compare` ``python -m userllm.profiling.compare`` (models built by :mod:`userllm.factory`);
* :mod:`.report`  ``python -m userllm.profiling.report RUN_DIR...``; :mod:`.plots` the PNGs.
"""
