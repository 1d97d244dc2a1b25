"""User-LLM against the TextPrompt baseline at several history lengths: tokens, FLOPs, time, memory, energy.

    python -m userllm.profiling.compare                      # lengths 50 100 200, synthetic data
    python -m userllm.profiling.compare --tiny --lengths 10 20 --steps 1 --new-tokens 4 --out /tmp/cmp

For every history length L it takes B users with exactly L events before their target and runs, for
both methods on the same examples, with the same LLM (same initial weights):

* a few training steps (forward + backward + AdamW; every parameter trainable): FLOPs measured on one
  step with :class:`~userllm.profiling.flops.ComponentFlopCounter`, wall/CPU/GPU time and peak memory
  over ``--steps`` more, NVML power/energy while they run;
* inference: prefill + ``--new-tokens`` greedy tokens with a KV cache (``generate``); the prefill alone
  is run too, so the per-token decode cost is (full - prefill) / (new tokens - 1).

Each configuration writes ``RUN/<method>_L<L>/profile.json``; :mod:`userllm.profiling.report` then builds
``report.md``, ``report.json`` and the PNG plots from them (the paper's Table 3 from measured counts,
next to the analytic estimate).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from userllm.errors import UserError
from userllm.utils.atomic import write_json

from userllm.utils.hf import first_target, forward_with_target_loss

from .flops import ComponentFlopCounter, FlopBreakdown, PassShape, analytic_generation, analytic_userllm, flops_summary
from .flops import model_components
from .measure import PROFILE_FILE, SCHEMA, environment, measure, profile_training_step, write_profile
from .timing import synchronize
from .tokens import dataset_tokens, full_window_examples, summarize

__all__ = ["CompareConfig", "load_data", "build_models", "run_configuration", "run_compare", "main",
           "SCHEMA", "PROFILE_FILE", "environment", "profile_training_step", "write_profile"]


@dataclass
class CompareConfig:
    dataset: str = "synthetic"
    path: str | None = None
    llm: str | None = None
    llm_hidden: int | None = None       # embedded default LLM size (None: 128 x 2 layers, 64 x 2 with tiny)
    llm_layers: int | None = None
    task: str = "nextitem"
    lengths: list[int] = field(default_factory=lambda: [50, 100, 200])
    batch_size: int = 4
    steps: int = 3
    new_tokens: int = 16
    integration: str = "xattn"
    perceiver_latents: int = 16
    task_prompt_len: int = 8
    encoder_dim: int = 64
    encoder_layers: int = 2
    tiny: bool = False
    device: str = "auto"
    seed: int = 0
    out: str = "runs/compare"
    sampler_interval_s: float = 0.05

    def train_config(self):
        """The comparison's model as :class:`~userllm.config.TrainConfig` options (what
        :mod:`userllm.factory` builds from): every parameter trainable, no LLM pretraining, closed gates."""
        from userllm.config import TrainConfig

        return TrainConfig(dataset=self.dataset, data_path=self.path, task=self.task, window=max(self.lengths),
                           llm=self.llm, llm_hidden=self.llm_hidden or 128, llm_layers=self.llm_layers or 2,
                           llm_pretrain_steps=0, integration=self.integration, xattn_gate_init=0.0,
                           perceiver_latents=self.perceiver_latents, soft_prompt_tokens=self.task_prompt_len,
                           encoder_dim=self.encoder_dim if not self.tiny else 32,
                           encoder_layers=self.encoder_layers if not self.tiny else 1, pretrain_steps=0,
                           strategy="full", seed=self.seed)

    def llm_config(self):
        """The embedded default LLM's layout (None with ``--llm``)."""
        from userllm.llm import DefaultLLMConfig

        if self.llm:
            return None
        if self.llm_hidden or self.llm_layers:
            d = DefaultLLMConfig()
            return DefaultLLMConfig.sized(self.llm_hidden or d.hidden_size, self.llm_layers or d.num_hidden_layers)
        if self.tiny:
            return DefaultLLMConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, vocab_size=1024)
        return DefaultLLMConfig()


def load_data(cfg: CompareConfig):
    """The comparison's dataset; synthetic: every user has a full window at every length (not cached)."""
    from userllm import factory
    from userllm.data.synthetic import SyntheticConfig

    tcfg = cfg.train_config()
    if cfg.dataset == "synthetic":
        n = max(cfg.lengths) + 2        # every user has a full window at every length (test target + val)
        syn = SyntheticConfig(num_users=max(cfg.batch_size, 8), num_items=400 if not cfg.tiny else 120,
                              min_events=n, max_events=n, seed=cfg.seed)
        return factory.load_data(tcfg, synthetic=syn, use_cache=False)
    return factory.load_data(tcfg)


def build_models(cfg: CompareConfig, ds) -> tuple[dict[str, nn.Module], Any, int | None]:
    """``({"userllm": UserLLM, "textprompt": the plain LLM}, tokenizer, LLM context length)`` built by
    :mod:`userllm.factory`, both from the same initial LLM weights."""
    from userllm import factory

    tcfg = cfg.train_config()
    llm, tok = factory.build_llm(tcfg, ds, default_config=cfg.llm_config())
    torch.manual_seed(cfg.seed)
    encoder = factory.build_encoder(tcfg, ds, dropout=0.0, max_len=max(max(cfg.lengths), 8))
    userllm = factory.build_model(tcfg, copy.deepcopy(llm), encoder)
    return {"userllm": userllm, "textprompt": llm}, tok, factory.llm_max_length(llm)


def run_configuration(cfg: CompareConfig, ds, tok, model: nn.Module, method: str, length: int,
                      device: torch.device, run_dir: Path, env: dict[str, Any]) -> dict[str, Any]:
    """Profile one (method, history length): training steps and inference; writes ``run_dir/profile.json``."""
    from userllm.data.examples import collate
    from userllm.llm_data import LLMBatcher

    ex = full_window_examples(ds, cfg.task, length, "test", limit=cfg.batch_size)
    if len(ex) < cfg.batch_size:
        raise UserError(f"history length {length}: only {len(ex)} users of {ds.name!r} have {length} events "
                        f"before their test target; need --batch-size {cfg.batch_size}")
    events = collate(ds, ex, list(range(len(ex))))
    batcher = LLMBatcher(ds, tok, cfg.task, text_events=None if method == "textprompt" else 0,
                         with_events=method == "userllm")
    train = batcher.train_batch(events).to(device)
    prompt = batcher.prompt_batch(events).to(device)
    counts = dataset_tokens(ds, tok, cfg.task, ex.start, ex.target, method, integration=cfg.integration,
                            perceiver_latents=cfg.perceiver_latents, task_prompt_len=cfg.task_prompt_len)
    B, T = train.input_ids.shape
    L = length if method == "userllm" else 0

    # ---- training ----
    model.to(device).train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    kw = train.model_inputs()

    def step():     # the training loss as userllm.train computes it (TextPromptModel for the plain LLM)
        loss = forward_with_target_loss(model, train.labels, **kw).loss if method == "textprompt" else \
            model(**kw, labels=train.labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    analytic_train = analytic_userllm(model, PassShape(B, T, L), phase="train", head_from=first_target(train.labels))
    n_tokens = int(train.attention_mask.sum())
    train_section = profile_training_step(step, model, device=device, steps=cfg.steps, tokens_per_step=n_tokens,
                                          analytic=analytic_train, sampler_interval_s=cfg.sampler_interval_s)
    train_section["shape"] = {"batch": B, "text_len": T, "n_events": L}
    del opt

    # ---- inference: prefill (+ first token) and prefill + new_tokens ----
    model.eval()
    pkw = prompt.model_inputs()
    pad = tok.pad_token_id

    def gen(n: int):
        with torch.no_grad():
            return model.generate(**pkw, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                                  pad_token_id=pad)

    comps, methods = model_components(model)
    measured = {}
    for name, n in (("prefill", 1), ("generate", cfg.new_tokens)):
        synchronize(device)
        with ComponentFlopCounter(comps, methods=methods) as counter:
            out = gen(n)
        synchronize(device)
        measured[name] = flops_summary(counter)
        if name == "generate":
            produced = out.shape[1] - prompt.input_ids.shape[1]
            if produced != n:
                raise RuntimeError(f"{method}: generate produced {produced} tokens instead of {n}")
    P = prompt.input_ids.shape[1]
    a_prefill, a_steps = analytic_generation(model, B, P, L, cfg.new_tokens)
    a_total = a_prefill
    for s in a_steps:
        a_total = a_total + s
    gen(1)                                                    # warm-up (allocator, caches)
    t_prefill = measure(lambda: gen(1), device, max(cfg.steps, 1), cfg.sampler_interval_s)
    t_full = measure(lambda: gen(cfg.new_tokens), device, max(cfg.steps, 1), cfg.sampler_interval_s)
    # min over repeats: the least-disturbed run of each (a difference of medians can go negative on a busy host)
    per_tok = max(t_full["wall_s_min"] - t_prefill["wall_s_min"], 0.0) / max(cfg.new_tokens - 1, 1)
    decode_measured = {k: (measured["generate"]["components"].get(k, {}).get("total", 0)
                           - v.get("total", 0)) / max(cfg.new_tokens - 1, 1)
                       for k, v in measured["prefill"]["components"].items()}
    inference = {
        "new_tokens": cfg.new_tokens,
        "shape": {"batch": B, "prompt_len": P, "n_events": L},
        "flops": {
            "prefill": {"measured": measured["prefill"], "analytic": a_prefill.to_dict()},
            "generate": {"measured": measured["generate"], "analytic": a_total.to_dict()},
            "decode_per_token": {"measured": {**decode_measured, "total": sum(decode_measured.values())},
                                 "analytic": (a_steps[0] if a_steps else FlopBreakdown()).to_dict()},
        },
        "timing": {"prefill": t_prefill, "generate": t_full, "decode_per_token_s": per_tok},
    }
    run = {"method": method, "history_length": length, "batch_size": B, "task": cfg.task, "dataset": ds.name,
           "integration": cfg.integration if method == "userllm" else None,
           "perceiver_latents": cfg.perceiver_latents if method == "userllm" else None,
           "task_prompt_len": cfg.task_prompt_len if method == "userllm" else None,
           "llm": cfg.llm or "<default>", "llm_params": int(sum(p.numel() for p in model.parameters())),
           "tiny": cfg.tiny, **env}
    tokens = {**summarize(counts), "per_example": [c.to_dict() for c in counts]}
    write_profile(run_dir, run=run, tokens=tokens, train_step=train_section, inference=inference)
    model.to("cpu")
    return {"run": run, "tokens": tokens, "train_step": train_section, "inference": inference}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return dev


def run_compare(cfg: CompareConfig, progress: Callable[[str], None] = print) -> Path:
    """Run every configuration, then write the report; returns the output directory."""
    from .report import build_report

    if not cfg.lengths or min(cfg.lengths) < 1:
        raise UserError("--lengths must be positive integers")
    if cfg.batch_size < 1 or cfg.steps < 0 or cfg.new_tokens < 2:
        raise UserError("need --batch-size >= 1, --steps >= 0 and --new-tokens >= 2")
    if cfg.llm and (cfg.llm_hidden or cfg.llm_layers):
        raise UserError("--llm-hidden/--llm-layers size the embedded default LLM; they cannot be used with --llm")
    for flag, value in (("--llm-hidden", cfg.llm_hidden), ("--llm-layers", cfg.llm_layers)):
        if value is not None and value < 1:
            raise UserError(f"{flag}: must be positive, got {value}")
    if cfg.llm_hidden and cfg.llm_hidden % (32 if cfg.llm_hidden < 512 else 64):
        raise UserError(f"--llm-hidden: must be a multiple of 32 (of 64 from 512), got {cfg.llm_hidden}")
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    ds = load_data(cfg)
    models, tok, max_pos = build_models(cfg, ds)
    env = environment(device)
    write_json(out / "compare_config.json", asdict(cfg))
    run_dirs = []
    for L in sorted(cfg.lengths):
        for method in ("userllm", "textprompt"):
            progress(f"[compare] history {L}: {method} ...")
            run_dir = out / "runs" / f"{method}_L{L}"
            # each configuration starts from the same weights
            model = copy.deepcopy(models[method])
            res = run_configuration(cfg, ds, tok, model, method, L, device, run_dir, env)
            if max_pos and res["inference"]["shape"]["prompt_len"] + cfg.new_tokens > max_pos:
                progress(f"[compare] warning: {method} at {L} exceeds the LLM's {max_pos} positions")
            run_dirs.append(run_dir)
            del model
    report = build_report(run_dirs, out)
    progress(f"[compare] report: {report}")
    return out


def build_parser():
    from userllm.cli import ArgumentParser
    from userllm.config import DATASETS, INTEGRATIONS

    d = CompareConfig()
    ap = ArgumentParser(prog="python -m userllm.profiling.compare",
                        description="Profile User-LLM against TextPrompt at several history lengths.")
    ap.add_argument("--dataset", default=d.dataset, choices=DATASETS, help="dataset reader")
    ap.add_argument("--path", default=None, help="the dataset's files (real datasets)")
    ap.add_argument("--llm", default=None, help="a local Hugging Face causal LM directory (default: embedded tiny Llama)")
    ap.add_argument("--llm-hidden", type=int, default=None,
                    help="embedded default LLM width (e.g. 1024 with --llm-layers 8: ~102M parameters)")
    ap.add_argument("--llm-layers", type=int, default=None, help="embedded default LLM decoder layers")
    ap.add_argument("--task", default=d.task, choices=["nextitem", "favgenre"], help="the task of the prompts")
    ap.add_argument("--lengths", type=int, nargs="+", default=d.lengths, help="history lengths (events)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="users per training step and request")
    ap.add_argument("--steps", type=int, default=d.steps, help="timed training steps / inference repeats")
    ap.add_argument("--new-tokens", type=int, default=d.new_tokens, help="generated tokens after the prefill")
    ap.add_argument("--integration", default=d.integration, choices=INTEGRATIONS,
                    help="how user embeddings enter the LLM")
    ap.add_argument("--perceiver-latents", type=int, default=d.perceiver_latents, help="0 = no Perceiver")
    ap.add_argument("--task-prompt-len", type=int, default=d.task_prompt_len,
                    help="learned task-prompt tokens (soft prompt)")
    ap.add_argument("--tiny", action="store_true", help="tiny LLM and encoder (fast CPU runs, tests)")
    ap.add_argument("--device", default=d.device, help="auto | cpu | cuda[:N]")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the initial weights and the data")
    ap.add_argument("--out", default=d.out, help="report directory")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = CompareConfig(**{k: v for k, v in vars(args).items()})
    run_compare(cfg)
    return 0


if __name__ == "__main__":
    from userllm.cli import run_cli

    raise SystemExit(run_cli(main))
