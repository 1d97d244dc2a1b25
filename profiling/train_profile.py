"""``python -m userllm.train --profile``: what ``profile.json`` holds for a training run (:class:`TrainProfiler`)."""

from __future__ import annotations

import contextlib
import statistics
from pathlib import Path

import torch
from torch import nn


class TrainProfiler:
    """``--profile``: what ``profile.json`` holds for a training run (rank 0), through :mod:`userllm.profiling`.

    * FLOPs of the first training step of this process, per component (LLM, encoder, projection, Perceiver,
      cross-attention; forward/backward), measured with ``FlopCounterMode``
      (:func:`userllm.profiling.measure.profile_training_step`) next to the analytic 6ND-style estimate
      for the same batch shape;
    * step times of the later steps (the FLOP-counted first step is slower and is left out), tokens/s
      (LLM input tokens incl. padding, per rank), peak memory (CUDA allocated on GPU, else the process's
      peak RSS during training), NVML utilisation / power / energy sampled during training on an NVIDIA
      GPU (without one, the reason is recorded and CPU time is still reported);
    * LLM context tokens per example (prompt + soft-prompt positions) and the evaluation's decode time.

    Written with :func:`userllm.profiling.measure.write_profile` under ``run``, ``tokens``, ``train_step``
    and ``evaluation``, so ``python -m userllm.profiling.report RUN_DIR`` reads it (``run.method`` /
    ``run.history_length`` pair User-LLM and TextPrompt runs by ``--window``).
    """

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.train_step: dict | None = None       # the FLOPs section, once the first step is counted
        self.shape: dict | None = None
        self.tokens: dict | None = None
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []
        self._stack = contextlib.ExitStack()

    def start(self) -> None:
        """Start the NVML sampler and the peak-memory / CPU-time window (call before the training loop)."""
        from .gpu import GpuSampler
        from .timing import Timer

        self.sampler = self._stack.enter_context(GpuSampler(interval_s=0.05))
        self.timer = self._stack.enter_context(Timer(self.device))

    def stop(self) -> None:
        self._stack.close()

    def first_step(self, model: nn.Module, step_fn, lb, batcher, events) -> None:
        """Run ``step_fn`` (one real training step on ``lb``) counting its FLOPs per component."""
        from userllm.utils.hf import first_target

        from .flops import PassShape, analytic_userllm
        from .measure import profile_training_step
        from .tokens import TokenCount, summarize

        B, T = lb.input_ids.shape
        L = int(lb.events.features[0].shape[1]) if lb.events is not None else 0
        target = model.llm if model.encoder is None else model
        self.train_step = profile_training_step(step_fn, target, device=self.device, steps=0,
                                                analytic=analytic_userllm(target, PassShape(B, T, L), phase="train",
                                                                          head_from=first_target(lb.labels)))
        self.shape = {"batch": B, "text_len": T, "n_events": L}
        # LLM context per example at inference: BOS + prompt (+ soft-prompt positions), as the model sees it.
        prompt = batcher.prompt_batch(events)
        n_events = events.lengths.tolist()
        method = "textprompt" if model.encoder is None else "userllm"
        self.tokens = summarize([TokenCount(method, n, int(t), 0 if method == "textprompt" else
                                            model.num_prefix_tokens(n))
                                 for n, t in zip(n_events, prompt.attention_mask.sum(1).tolist())])

    def record(self, seconds: float, tokens: int) -> None:
        self.step_times.append(seconds)
        self.step_tokens.append(tokens)

    def write(self, run_dir: Path, model: nn.Module, results: dict, world: int) -> Path:
        from .measure import environment, write_profile

        cfg = self.cfg
        times = self.step_times[1:]             # the first (FLOP-counted) step is not timed
        tokens = self.step_tokens[1:]
        gpu = self.sampler.report()
        t = self.timer.result
        timing = {"repeats": len(times), "wall_s": statistics.median(times) if times else None,
                  "wall_s_mean": statistics.fmean(times) if times else None,
                  "wall_s_min": min(times) if times else None, "wall_s_all": [round(x, 6) for x in times],
                  "cpu_s_total": t.cpu_s, "wall_s_total": t.wall_s, "peak_mem_bytes": t.peak_mem_bytes,
                  "peak_rss_bytes": t.peak_rss_bytes, "rss_peak_scope": t.rss_peak_scope, "gpu": gpu.to_dict(),
                  "energy_j": None if gpu.energy_j is None else gpu.energy_j / max(len(self.step_times), 1),
                  "energy": "n/a (no NVIDIA GPU)" if not gpu.available else (
                      "n/a (energy not supported by this GPU)" if gpu.energy_j is None else "per step, "
                      "averaged over every training step")}
        train_step = {**(self.train_step or {}), "shape": self.shape, "timing": timing,
                      "tokens_per_step": statistics.fmean(tokens) if tokens else None,
                      "tokens_per_s": sum(tokens) / sum(times) if times and sum(times) > 0 else None,
                      "strategy": cfg.strategy}
        method = "textprompt" if model.encoder is None else "userllm"
        run = {"method": method, "history_length": cfg.window, "batch_size": (self.shape or {}).get("batch"),
               "global_batch_size": cfg.batch_size, "world_size": world, "task": cfg.task, "dataset": cfg.dataset,
               "model": cfg.model_name, "strategy": cfg.strategy,
               "integration": cfg.integration if method == "userllm" else None,
               "perceiver_latents": cfg.perceiver_latents if method == "userllm" else None,
               "task_prompt_len": cfg.soft_prompt_tokens if method == "userllm" else None,
               "llm": cfg.llm or "<default>", "llm_params": int(sum(p.numel() for p in model.parameters())),
               "kernels": cfg.fused_kernels, "source": "python -m userllm.train --profile",
               **environment(self.device)}
        split = results.get("split", "test")
        evaluation = {"split": split, "decode_seconds": results.get(split, {}).get("decode_seconds"),
                      "users": results.get(split, {}).get("count")}
        return write_profile(run_dir, run=run, tokens=self.tokens, train_step=train_step, evaluation=evaluation)
