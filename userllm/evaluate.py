"""Evaluation of User-LLM / TextPrompt runs, and ``python -m userllm.evaluate RUN_DIR``.

* NextItem: the model generates item titles with beam search constrained by a prefix trie over the
  catalogue's titles (every output is a real item); Recall@1/5/10 from the top-10 beams.
* FavGenre / FavCat: the same over the category names.
* ReviewG: greedy decoding, ROUGE-1/2/L/Lsum (``rouge-score`` via :func:`userllm.metrics.rouge`).

Also reported: the teacher-forced loss of the targets (a likelihood view of the same examples) and, for
NextItem / FavGenre, a popularity baseline on the same users (the most frequent training answers).

``python -m userllm.evaluate RUN_DIR`` rebuilds the run's model from ``config.json`` + ``llm/`` +
``encoder.json`` and re-evaluates its latest checkpoint (or ``--checkpoint``), printing the table and
writing ``eval.json`` into the run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .cli import run_cli
from .data.examples import Examples, collate
from .decoding import HFStepper, UserLLMStepper, constrained_beam_search, greedy_decode, recall_from_beams
from .training import progress

KS = (1, 5, 10)


def eval_subset(examples: Examples, max_users: int, seed: int = 1234) -> Examples:
    """At most ``max_users`` examples (one per user on val/test), a fixed random subset in user order.

    The seed is fixed (not the training seed) so that runs with different seeds are scored on the same users.
    """
    n = len(examples)
    if not max_users or max_users >= n:
        return examples
    return examples.subset(np.sort(np.random.default_rng(seed).choice(n, max_users, replace=False)))


def _is_user_llm(model) -> bool:
    return hasattr(model, "prepare_user_context")


@torch.no_grad()
def teacher_forced_loss(model, batcher, ds, examples: Examples, batch_size: int, device, amp) -> float:
    """Mean target-token cross-entropy over ``examples`` (every target token weighs the same)."""
    total, count = 0.0, 0
    for a in range(0, len(examples), batch_size):
        lb = batcher.train_batch(collate(ds, examples, np.arange(a, min(a + batch_size, len(examples))))).to(device)
        with amp():
            logits = forward_logits(model, lb)
        shift_logits, shift_labels = logits[:, :-1].float(), lb.labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                 shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((shift_labels != -100).sum())
    return total / max(count, 1)


def forward_logits(model, lb) -> torch.Tensor:
    """Logits [B, T, V] of an :class:`~userllm.llm_data.LLMBatch` (UserLLM or plain LM)."""
    if lb.events is not None:
        return model(input_ids=lb.input_ids, attention_mask=lb.attention_mask, features=lb.events.features,
                     lengths=lb.events.lengths).logits
    return model(input_ids=lb.input_ids, attention_mask=lb.attention_mask).logits


@torch.no_grad()
def generate_and_score(model, batcher, ds, examples: Examples, *, beams: int = 10, batch_size: int = 32,
                       device: torch.device | str = "cpu", amp=contextlib.nullcontext, max_new_tokens: int = 32,
                       disable_progress: bool | None = None, samples: int = 5) -> dict:
    """Generate for every example and score: Recall@k (catalogue tasks) or ROUGE (reviewg).

    model: a UserLLM or a module with ``.llm`` (TextPrompt); it is put in eval mode by the caller.
    Returns {"recall@k"... | "rougeLsum"...,  "count", "samples": [...], "decode_seconds"}.
    """
    tok = batcher.tok
    user_llm = _is_user_llm(model)
    stepper = UserLLMStepper(model) if user_llm else HFStepper(model.llm)
    catalogue = batcher.catalogue
    trie = catalogue.trie(tok) if catalogue is not None else None
    entries_all: list[list[int]] = []
    labels_all: list[int] = []
    preds, refs = [], []
    t0 = time.time()
    bar = progress(total=len(examples), desc=f"evaluate {batcher.task}", disable=disable_progress)
    for a in range(0, len(examples), batch_size):
        idx = np.arange(a, min(a + batch_size, len(examples)))
        pb = batcher.prompt_batch(collate(ds, examples, idx)).to(device)
        with amp():
            if user_llm:
                logits, past = stepper.prefill(pb.input_ids, pb.attention_mask, pb.events.features,
                                               pb.events.lengths)
            else:
                logits, past = stepper.prefill(pb.input_ids, pb.attention_mask)
            if trie is not None:
                out = constrained_beam_search(stepper, logits, past, trie, num_beams=beams)
                entries_all += out.entries
                labels_all += pb.entry_labels.tolist()
            else:
                ids = greedy_decode(stepper, logits, past, tok.eos_token_id, max_new_tokens)
                preds += [tok.decode(x, skip_special_tokens=True).strip() for x in ids]
                refs += pb.references
        bar.update(len(idx))
    bar.close()
    result: dict = {"count": len(examples), "decode_seconds": round(time.time() - t0, 2)}
    if trie is not None:
        result.update(recall_from_beams(entries_all, labels_all, [k for k in KS if k <= beams]))
        result["samples"] = [{"reference": catalogue.entries[lab] if lab >= 0 else None,
                              "top3": [catalogue.entries[e] for e in ents[:3]]}
                             for ents, lab in zip(entries_all[:samples], labels_all[:samples])]
    else:
        from .metrics import rouge

        result.update(rouge(preds, refs))
        result["samples"] = [{"reference": r, "generated": p} for r, p in zip(refs[:samples], preds[:samples])]
    return result


def popularity_baseline(ds, train_examples: Examples, examples: Examples, catalogue) -> dict:
    """Recall@k of always answering the k most frequent training answers (items, or categories for FavGenre)."""
    counts = np.bincount(train_examples.labels[train_examples.labels > 0], minlength=len(catalogue.label_to_entry))
    ranked, seen = [], set()
    for item in np.argsort(-counts, kind="stable").tolist():
        e = int(catalogue.label_to_entry[item]) if item < len(catalogue.label_to_entry) else -1
        if e >= 0 and e not in seen:
            ranked.append(e)
            seen.add(e)
        if len(ranked) == max(KS):
            break
    labels = catalogue.label_to_entry[examples.labels].tolist()
    return {"count": len(examples), **recall_from_beams([ranked] * len(labels), labels, KS)}


# Short column titles of the diagnostics (userllm.diagnostics): loss with shuffled / no histories minus own.
COLUMN_TITLES = {"context_gain": "gain(shuf)", "context_gain_none": "gain(none)"}


def format_table(rows: Sequence[dict], title: str) -> str:
    """A plain-text results table; rows: {"model", "task", metric...}."""
    metric_cols = [c for c in ("recall@1", "recall@5", "recall@10", "rouge1", "rouge2", "rougeLsum", "loss",
                               "context_gain", "context_gain_none") if any(c in r for r in rows)]
    cols = ["model", "task"] + metric_cols + ["users"]
    head = {c: COLUMN_TITLES.get(c, c) for c in cols}
    width = {c: max(len(head[c]), *(len(_fmt(r.get(c if c != "users" else "count"))) for r in rows)) for c in cols}
    lines = [title, "  ".join(head[c].ljust(width[c]) if i < 2 else head[c].rjust(width[c])
                              for i, c in enumerate(cols))]
    for r in rows:
        vals = [_fmt(r.get(c if c != "users" else "count")) for c in cols]
        lines.append("  ".join(v.ljust(width[c]) if i < 2 else v.rjust(width[c])
                               for i, (c, v) in enumerate(zip(cols, vals))))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class LoadedRun:
    """A trained run rebuilt from its directory (see :func:`load_run`); ``model`` is in eval mode on ``device``."""

    run_dir: Path
    cfg: Any                  # the run's TrainConfig (with the overrides applied)
    checkpoint: Path
    device: torch.device
    ds: Any                   # the ProcessedDataset the run was trained on
    tok: Any                  # the run's tokenizer
    model: torch.nn.Module    # UserLLM, or the TextPrompt wrapper (``.llm``)
    batcher: Any              # the run's LLMBatcher (prompts, targets, catalogue)
    amp: Callable[[], Any]    # autocast context factory (bf16 on GPU when the run used it)

    @property
    def user_llm(self) -> bool:
        return _is_user_llm(self.model)


def load_run(run_dir: str | Path, *, checkpoint: str | Path | None = None, device: str | None = None,
             threads: int | None = None, overrides: dict[str, Any] | None = None) -> LoadedRun:
    """Rebuild a run's model from ``config.json`` + ``llm/`` + ``encoder.json`` and load a checkpoint
    (default: the latest). ``overrides``: run options to change (e.g. ``eval_users``, ``beams``; None
    values are ignored). Raises UserError for a directory that is not a run or has no checkpoint."""
    from .checkpoint import latest_checkpoint, load_checkpoint
    from .config import TrainConfig
    from .encoders import build_encoder
    from .errors import UserError
    from .train import (build_model, checkpoint_modules, load_data, load_run_llm, make_batcher, select_kernels,
                        set_threads)
    from .training import autocast, pick_device

    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise UserError(f"{run}: not a run directory (no config.json)")
    saved = json.loads((run / "config.json").read_text())
    cfg = TrainConfig.from_dict(saved, source=str(run / "config.json"))
    for key, value in {**(overrides or {}), "device": device, "threads": threads}.items():
        if value is not None:
            setattr(cfg, key, value)
    cfg.validate()
    dev = pick_device(cfg.device)
    set_threads(cfg, dev)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run)
    if ckpt is None:
        raise UserError(f"{run}: no checkpoint to load")
    if not ckpt.is_file():
        raise UserError(f"--checkpoint {ckpt}: file not found")
    select_kernels(cfg, dev)
    ds = load_data(cfg)
    llm, tok = load_run_llm(cfg, run)
    encoder = None
    if cfg.baseline != "textprompt":
        spec = json.loads((run / "encoder.json").read_text())
        encoder = build_encoder(spec["kind"], spec["config"])
    model = build_model(cfg, llm, encoder)
    load_checkpoint(ckpt, checkpoint_modules(model, cfg), restore_rng_state=False)
    model.to(dev).eval()
    batcher = make_batcher(cfg, ds, tok, model)
    amp = (lambda: autocast(dev)) if cfg.bf16 else contextlib.nullcontext
    return LoadedRun(run, cfg, ckpt, dev, ds, tok, model, batcher, amp)


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m userllm.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory written by python -m userllm.train")
    parser.add_argument("--checkpoint", help="checkpoint file (default: the run's latest)")
    parser.add_argument("--eval-users", type=int, help="override the run's --eval-users")
    parser.add_argument("--beams", type=int, help="override the run's --beams")
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--device", default=None, help="override the run's --device")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    from .train import evaluate_run

    evaluate_run(args.run_dir, checkpoint=args.checkpoint, eval_users=args.eval_users, beams=args.beams,
                 split=args.split, device=args.device, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
